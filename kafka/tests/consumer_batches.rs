//! The consumer loop against rdkafka's in-process `MockCluster`: messages fetched together
//! commit together, and a bad message among them still gets exactly what it would get alone
//! (a duplicate ignored, undecodable or rejected ones parked, the rest applied once, in order);
//! a database that refuses writes for a while (read-only) is waited out, never parked; a
//! handler that panics parks its event with the payload's SHA-256; a stop gives the
//! partition leases up at once; a parking record that cannot be written holds the partition
//! (named in the status) instead of skipping the message.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use events::{Envelope, Event, OrderCompleted, Service};
use kafka::consumer::{EventConsumer, create_probe};
use kafka::db::{AfterCommit, DbConnection, PLUMBING_MIGRATIONS, WriteHook};
use kafka::{Database, DbError, KafkaSettings, Metrics, ReactError, Reactor};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "t";
/// The order id this reactor refuses.
const REFUSED_ORDER: i64 = 13;
/// The order id whose first writes meet a read-only database.
const READ_ONLY_ORDER: i64 = 7;
/// The order id whose handler panics.
const PANICKING_ORDER: i64 = 9;

/// Records each applied order id in a table, in the transaction it is given, and causes one
/// event for it; refuses one; panics on one; meets a read-only database on another the first
/// `read_only` times.
#[derive(Default)]
struct Recording {
    read_only: AtomicU32,
    read_only_calls: AtomicU32,
}

impl Reactor for Recording {
    fn wants(&self, _: &Envelope) -> bool {
        true
    }

    fn react(
        &self,
        conn: &mut DbConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        let Event::OrderCompleted(done) = &event.event else {
            return Ok(Vec::new());
        };
        match done.order_id {
            REFUSED_ORDER => return Err(ReactError::Rejected("order 13 is refused".into())),
            PANICKING_ORDER => panic!("a bug in the handler of order 9"),
            READ_ONLY_ORDER => {
                self.read_only_calls.fetch_add(1, Ordering::SeqCst);
                let left = self.read_only.load(Ordering::SeqCst);
                if left > 0 {
                    self.read_only.store(left - 1, Ordering::SeqCst);
                    // A real SQLite error: the connection refuses writes, as a database
                    // whose file or disk turned read-only does.
                    conn.batch_execute("PRAGMA query_only = ON")
                        .map_err(DbError::from)?;
                    let refused =
                        conn.batch_execute("INSERT INTO processed_events VALUES ('x', 'y', 'z')");
                    conn.batch_execute("PRAGMA query_only = OFF")
                        .map_err(DbError::from)?;
                    let error = DbError::from(refused.expect_err("a read-only connection writes"));
                    assert!(error.to_string().contains("readonly"), "{error}");
                    return Err(error.into());
                }
            }
            _ => {}
        }
        conn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY, order_id BIGINT); \
             INSERT INTO seen (order_id) VALUES ({})",
            done.order_id
        ))
        .map_err(DbError::from)?;
        Ok(vec![completed(done.order_id)])
    }
}

/// Notes, after each commit, the orders whose caused events committed in it: one entry per
/// committed write.
#[derive(Default, Clone)]
struct Commits(Arc<Mutex<Vec<Vec<i64>>>>);

impl WriteHook for Commits {
    fn writing(
        &self,
        _: &mut DbConnection,
        events: &[Envelope],
    ) -> diesel::QueryResult<Option<AfterCommit>> {
        let orders: Vec<i64> = events.iter().filter_map(|e| e.event.order_id()).collect();
        let commits = self.0.clone();
        Ok(Some(Box::new(move || {
            commits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(orders);
        })))
    }
}

fn completed(order_id: i64) -> Envelope {
    Envelope::new(
        Service::Orders,
        Event::OrderCompleted(OrderCompleted {
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
        }),
    )
}

#[derive(QueryableByName)]
struct Seen {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    order_id: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// A consumer run: the cluster, the database (with a [`Commits`] hook) and what it counted.
struct Run {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    _dir: tempfile::TempDir,
    db: Database,
    commits: Commits,
    status: Arc<kafka::consumer::ConsumerStatus>,
    metrics: Metrics,
    /// Leases held by the consumer just before it was stopped.
    held_while_running: i64,
    /// Leases still held once it stopped (given up by [`EventConsumer::leave`] after that).
    held_after_stop: i64,
}

/// A consumer started on a topic holding `payloads`.
struct Started {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    dir: tempfile::TempDir,
    db: Database,
    commits: Commits,
    status: Arc<kafka::consumer::ConsumerStatus>,
    metrics: Metrics,
    settings: KafkaSettings,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

/// Puts `payloads` on a one-partition topic and starts a consumer with `reactor` on a fresh
/// database, prepared by `prepare` before the consumer reads anything.
async fn start(
    payloads: &[Vec<u8>],
    reactor: Arc<Recording>,
    prepare: impl FnOnce(&mut DbConnection) + Send + 'static,
) -> Started {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    cluster
        .create_topic(&format!("{TOPIC}.DLT"), 1, 1)
        .expect("dead-letter topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .expect("producer");
    // Everything is on the topic before the consumer starts, so its first fetch brings all.
    for payload in payloads {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(TOPIC).payload(payload),
                Duration::from_secs(5),
            )
            .await
            .expect("produce");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let commits = Commits::default();
    let db = Database::open(
        dir.path().join("c.db").to_str().expect("path"),
        PLUMBING_MIGRATIONS,
    )
    .expect("database")
    .with_write_hook(Arc::new(commits.clone()));
    db.write(move |conn| {
        prepare(conn);
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .expect("prepared");
    let settings = KafkaSettings {
        fetch_wait_max: Duration::from_millis(10),
        instance: "test-1".into(),
        ..KafkaSettings::new(&cluster.bootstrap_servers(), TOPIC, "test")
    };
    let metrics = Metrics::new();
    let consumer = EventConsumer::new(
        &settings,
        Arc::new(create_probe(&settings).expect("probe")),
        db.clone(),
        reactor,
        &metrics,
    );
    let status = consumer.status();
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    Started {
        cluster,
        dir,
        db,
        commits,
        status,
        metrics,
        settings,
        stop,
        running,
    }
}

/// The stored position of the topic's partition.
async fn position(db: &Database) -> Option<i64> {
    db.read(|conn| kafka::offsets::load(conn, TOPIC).map_err(DbError::from))
        .await
        .expect("positions")
        .get(&0)
        .copied()
}

/// Waits (at most 20 s) until `condition` holds of the consumer's database and status.
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        assert!(started.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Puts `payloads` on a one-partition topic, then consumes them with `reactor` until the
/// stored position is past the last, and stops the consumer.
async fn consume(payloads: &[Vec<u8>], reactor: Arc<Recording>) -> Run {
    let started = start(payloads, reactor, |_| {}).await;
    let end = payloads.len() as i64;
    let db = started.db.clone();
    wait_until(&format!("position {end}"), || {
        let db = db.clone();
        async move { position(&db).await == Some(end) }
    })
    .await;
    let held_while_running = leases_of(&started.db, "test-1").await;
    started.stop.cancel();
    started.running.await.expect("consumer task");
    // The host's relay publishes under these leases before the host gives them up.
    let held_after_stop = leases_of(&started.db, "test-1").await;
    EventConsumer::leave(&started.db, &started.settings).await;
    Run {
        _cluster: started.cluster,
        _dir: started.dir,
        db: started.db,
        commits: started.commits,
        status: started.status,
        metrics: started.metrics,
        held_while_running,
        held_after_stop,
    }
}

/// How many partition leases of the topic `holder` holds.
async fn leases_of(db: &Database, holder: &str) -> i64 {
    let query = format!(
        "SELECT COUNT(*) AS n FROM leases WHERE holder = '{holder}' AND name LIKE '{TOPIC}/%'"
    );
    db.read(move |conn| {
        diesel::sql_query(query)
            .get_result::<Count>(conn)
            .map_err(DbError::from)
    })
    .await
    .expect("leases")
    .n
}

async fn seen(db: &Database) -> Vec<i64> {
    db.read(|conn| {
        diesel::sql_query("SELECT order_id FROM seen ORDER BY seq")
            .load::<Seen>(conn)
            .map_err(DbError::from)
    })
    .await
    .expect("seen")
    .into_iter()
    .map(|s| s.order_id)
    .collect()
}

/// The value of a sample of `metrics` (no labels).
fn sample(metrics: &Metrics, name: &str) -> Option<f64> {
    metrics.render().lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|n| n.parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_batch_commits_together_and_bad_messages_in_it_are_handled_one_by_one() {
    let first = completed(1);
    let payloads: Vec<Vec<u8>> = vec![
        first.to_json().into_bytes(),
        completed(2).to_json().into_bytes(),
        first.to_json().into_bytes(), // a redelivery
        b"\0\0 not json".to_vec(),
        completed(REFUSED_ORDER).to_json().into_bytes(),
        completed(4).to_json().into_bytes(),
        br#"{"eventType":"SomethingNew","eventId":"x"}"#.to_vec(),
        completed(5).to_json().into_bytes(),
    ];
    let run = consume(&payloads, Arc::new(Recording::default())).await;

    assert_eq!(
        seen(&run.db).await,
        vec![1, 2, 4, 5],
        "each applied once, in topic order"
    );
    let parked = run
        .db
        .read(|conn| kafka::parking::count(conn).map_err(DbError::from))
        .await
        .expect("parked");
    assert_eq!(parked, 2, "the undecodable and the refused message");
    let health = run.status.snapshot();
    assert_eq!(health["applied"], 4, "{health}");
    assert_eq!(health["duplicatesIgnored"], 1, "{health}");
    assert_eq!(health["parked"], 2, "{health}");
    // Each applied in a commit of its own events, once: nothing of the refused run
    // committed, and nothing was applied twice.
    let applied: Vec<i64> = run.commits.0.lock().unwrap().concat();
    assert_eq!(applied, vec![1, 2, 4, 5]);
}

/// Messages fetched together commit together: one transaction per fetched batch, whatever
/// the broker's split of the topic into fetches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fetched_batch_is_one_commit() {
    let payloads: Vec<Vec<u8>> = (100..300)
        .map(|order| completed(order).to_json().into_bytes())
        .collect();
    let run = consume(&payloads, Arc::new(Recording::default())).await;
    assert_eq!(seen(&run.db).await, (100..300).collect::<Vec<_>>());
    let batches = sample(&run.metrics, "mall_consumer_batch_messages_count").unwrap_or_default();
    let commits = run.commits.0.lock().unwrap().clone();
    assert_eq!(
        commits.len() as f64,
        batches,
        "one commit per fetched batch: {commits:?}"
    );
    assert!(
        commits.len() < payloads.len() / 2,
        "{} commits for {} messages: nothing was applied together",
        commits.len(),
        payloads.len()
    );
}

/// An event whose writes meet a read-only database is retried (with backoff) until the
/// database takes it, then applied once — never parked, which would lose its effect; an
/// event whose handler panics is parked as such, with its payload's size and SHA-256; the
/// events behind both are applied in order. A stop then gives the partition leases up at
/// once: another instance takes them on its next round, without waiting for them to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_waited_out_a_panic_is_parked_and_a_stop_frees_the_leases() {
    use sha2::{Digest, Sha256};
    let panicking = completed(PANICKING_ORDER).to_json().into_bytes();
    let payloads: Vec<Vec<u8>> = vec![
        completed(6).to_json().into_bytes(),
        completed(READ_ONLY_ORDER).to_json().into_bytes(),
        panicking.clone(),
        completed(10).to_json().into_bytes(),
    ];
    let reactor = Arc::new(Recording {
        read_only: AtomicU32::new(4),
        ..Recording::default()
    });
    let run = consume(&payloads, reactor.clone()).await;

    assert_eq!(seen(&run.db).await, vec![6, READ_ONLY_ORDER, 10]);
    assert_eq!(
        reactor.read_only_calls.load(Ordering::SeqCst),
        5,
        "four refusals, then applied"
    );
    let retries = sample(&run.metrics, "mall_event_retries_total").unwrap_or_default();
    assert!(retries >= 3.0, "retried {retries} times");
    let health = run.status.snapshot();
    assert_eq!(health["applied"], 3, "{health}");
    assert_eq!(health["parked"], 1, "{health}");
    assert!(health["retrying"].is_null(), "{health}");

    let parked = run
        .db
        .read(|conn| {
            kafka::parking::list(
                conn,
                kafka::http::Page {
                    after: 0,
                    limit: 10,
                },
                None,
            )
            .map_err(DbError::from)
        })
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1, "{parked:?}");
    let letter = &parked[0];
    assert_eq!(letter.kind, "HandlerPanicked");
    assert!(
        letter.reason.contains("a bug in the handler of order 9"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.offset_, 2);
    assert_eq!(letter.payload_bytes, panicking.len() as i64);
    let sha: String = Sha256::digest(&panicking)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(letter.payload_sha256, sha);
    // The dead letter queued for the DLT says the same.
    let queued = run
        .db
        .read(|conn| kafka::outbox::pending(conn, 100).map_err(DbError::from))
        .await
        .expect("outbox");
    let dead: Vec<_> = queued
        .iter()
        .filter(|r| r.topic.as_deref() == Some("t.DLT"))
        .collect();
    assert_eq!(dead.len(), 1);
    let published = events::DeadLetter::decode(dead[0].payload.as_bytes()).expect("a dead letter");
    assert_eq!(published.payload_sha256, sha);

    assert!(
        run.held_while_running > 0,
        "the consumer held its partition"
    );
    assert_eq!(
        run.held_after_stop, run.held_while_running,
        "kept while the relay drains"
    );
    assert_eq!(leases_of(&run.db, "test-1").await, 0, "given up on leaving");
    let other = kafka::leases::Membership {
        me: "test-2".into(),
        ttl: Duration::from_secs(10),
    };
    let taken = run
        .db
        .write(move |conn| Ok::<_, DbError>((other.balance(conn, TOPIC, &[0])?, Vec::new())))
        .await
        .expect("balance");
    assert_eq!(taken.holds.len(), 1, "the other instance takes it at once");
}

/// Writing the parking record itself fails, and not because of the environment (here a
/// unique index the record collides with, a broken table as far as the consumer can tell):
/// the message is not skipped unrecorded. The consumer stays on it, retrying, and its status
/// (`/health`) names it; the messages behind it wait. Once the table takes the record, the
/// message is parked once and the rest applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parking_record_that_cannot_be_written_holds_the_partition_and_says_so() {
    let payloads: Vec<Vec<u8>> = [1, REFUSED_ORDER, 2]
        .into_iter()
        .map(|id| completed(id).to_json().into_bytes())
        .collect();
    let started = start(&payloads, Arc::new(Recording::default()), |conn| {
        conn.batch_execute(
            "INSERT INTO dead_letters (kind, reason, topic, partition, \"offset\", \
             payload_bytes, payload_sha256, parked_at) VALUES ('x', 'x', 't', 0, -1, 0, '', ''); \
             CREATE UNIQUE INDEX one_dead_letter_per_topic ON dead_letters (topic);",
        )
        .expect("blocker");
    })
    .await;
    let status = started.status.clone();
    wait_until("the consumer reports it cannot park", || {
        let health = status.snapshot();
        async move {
            health["retrying"]["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("parking"))
        }
    })
    .await;
    let health = started.status.snapshot();
    assert!(
        health["retrying"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("UNIQUE")),
        "{health}"
    );
    assert_eq!(position(&started.db).await, Some(1), "not skipped");
    assert_eq!(seen(&started.db).await, vec![1], "the rest waits");
    assert_eq!(health["parked"], 0, "{health}");

    started
        .db
        .write(|conn| {
            conn.batch_execute(
                "DROP INDEX one_dead_letter_per_topic; DELETE FROM dead_letters WHERE \"offset\" = -1",
            )?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .expect("unblocked");
    let db = started.db.clone();
    wait_until("position 3", || {
        let db = db.clone();
        async move { position(&db).await == Some(3) }
    })
    .await;
    started.stop.cancel();
    started.running.await.expect("consumer task");
    assert_eq!(seen(&started.db).await, vec![1, 2]);
    let parked = started
        .db
        .read(|conn| {
            let page = kafka::http::Page {
                after: 0,
                limit: 10,
            };
            kafka::parking::list(conn, page, None).map_err(DbError::from)
        })
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].offset_, 1);
    assert_eq!(parked[0].status, "parked");
    let health = started.status.snapshot();
    assert_eq!(health["parked"], 1, "{health}");
    assert!(health["retrying"].is_null(), "{health}");
}
