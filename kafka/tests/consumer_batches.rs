//! The consumer loop against rdkafka's in-process `MockCluster`: messages fetched together
//! commit together, and a bad message among them still gets exactly what it would get alone
//! (a duplicate ignored, undecodable or rejected ones parked, the rest applied once, in order).

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use events::{Envelope, Event, OrderCompleted, Service};
use kafka::consumer::{EventConsumer, create_probe};
use kafka::db::DbConnection;
use kafka::db::PLUMBING_MIGRATIONS;
use kafka::{Database, DbError, KafkaSettings, Metrics, ReactError, Reactor};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "t";
/// The order id this reactor refuses.
const REFUSED_ORDER: i64 = 13;

/// Records each applied order id in a table, in the transaction it is given; refuses one.
struct Recording;

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
        if done.order_id == REFUSED_ORDER {
            return Err(ReactError::Rejected("order 13 is refused".into()));
        }
        conn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY, order_id BIGINT); \
             INSERT INTO seen (order_id) VALUES ({})",
            done.order_id
        ))
        .map_err(DbError::from)?;
        Ok(Vec::new())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_batch_commits_together_and_bad_messages_in_it_are_handled_one_by_one() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    cluster
        .create_topic(&format!("{TOPIC}.DLT"), 1, 1)
        .expect("dead-letter topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .expect("producer");
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
    // Everything is on the topic before the consumer starts, so its first fetch brings all.
    for payload in &payloads {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(TOPIC).payload(payload),
                Duration::from_secs(5),
            )
            .await
            .expect("produce");
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::open(
        dir.path().join("c.db").to_str().expect("path"),
        PLUMBING_MIGRATIONS,
    )
    .expect("database");
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
        Arc::new(Recording),
        &metrics,
    );
    let status = consumer.status();
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));

    let end = payloads.len() as i64;
    let started = Instant::now();
    loop {
        let stored = db
            .read(|conn| kafka::offsets::load(conn, TOPIC).map_err(DbError::from))
            .await
            .expect("positions");
        if stored.get(&0) == Some(&end) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "position {stored:?} never reached {end}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.await.expect("consumer task");

    let seen: Vec<i64> = db
        .read(|conn| {
            diesel::sql_query("SELECT order_id FROM seen ORDER BY seq")
                .load::<Seen>(conn)
                .map_err(DbError::from)
        })
        .await
        .expect("seen")
        .into_iter()
        .map(|s| s.order_id)
        .collect();
    assert_eq!(seen, vec![1, 2, 4, 5], "each applied once, in topic order");
    let parked = db
        .read(|conn| kafka::parking::count(conn).map_err(DbError::from))
        .await
        .expect("parked");
    assert_eq!(parked, 2, "the undecodable and the refused message");
    let health = status.snapshot();
    assert_eq!(health["applied"], 4, "{health}");
    assert_eq!(health["duplicatesIgnored"], 1, "{health}");
    assert_eq!(health["parked"], 2, "{health}");
    let fetches = metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("mall_consumer_batch_messages_count "))
        .and_then(|n| n.parse::<usize>().ok())
        .expect("batch histogram");
    assert!(
        fetches < payloads.len(),
        "{fetches} batches for {} messages: nothing was handled together",
        payloads.len()
    );
}
