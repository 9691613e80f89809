//! The plumbing on PostgreSQL, with two `Database` handles on one database standing for two
//! instances of a service. Runs when `TEST_POSTGRES_URL` names a server's maintenance
//! database (`scripts/test.sh` starts one). Without it each test says it was skipped — or
//! fails, when `REQUIRE_POSTGRES=1` says a server was meant to be there (`scripts/test.sh`
//! sets it, so a missing server is a failure there, not a silent pass).

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use kafka::db::{Database, DbError, Lock, PLUMBING_MIGRATIONS};
use kafka::leases::{self, Membership};
use std::time::Duration;

/// A fresh database on the test server, or `None` (skipped) without `TEST_POSTGRES_URL`;
/// panics without it when `REQUIRE_POSTGRES=1`.
fn fresh_database(name: &str) -> Option<String> {
    let server = std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty());
    let required = std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let server = match server {
        Some(server) => server,
        None if required => panic!("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set"),
        None => return None,
    };
    let name = format!("kafka_{name}_{}", std::process::id());
    let mut admin = diesel::PgConnection::establish(&server).expect("test server");
    // Two calls: several statements in one would run as one transaction, which DROP refuses.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .expect("old database dropped");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("fresh database");
    let base = server.rsplit_once('/').expect("a database in the URL").0;
    Some(format!("{base}/{name}"))
}

macro_rules! database_or_skip {
    ($name:expr) => {
        match fresh_database($name) {
            Some(url) => url,
            None => {
                // Past the test harness's capture: a skip is seen, not counted as a pass.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "{}: skipped, TEST_POSTGRES_URL is not set",
                    $name
                );
                return;
            }
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_never_lose_an_update_and_both_migrate_at_once() {
    let url = database_or_skip!("writes");
    let (a, b) = {
        let (u1, u2) = (url.clone(), url.clone());
        let one = tokio::task::spawn_blocking(move || Database::open(&u1, PLUMBING_MIGRATIONS));
        let two = tokio::task::spawn_blocking(move || Database::open(&u2, PLUMBING_MIGRATIONS));
        (one.await.unwrap().unwrap(), two.await.unwrap().unwrap())
    };
    a.write(|conn| {
        conn.batch_execute(
            "CREATE TABLE counter (n BIGINT NOT NULL); INSERT INTO counter VALUES (0)",
        )?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    // Read, decide, write: without the lock on what is decided on, READ COMMITTED loses
    // updates.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let db = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            db.write(|conn| {
                kafka::db::lock(conn, Lock::Product(1))?;
                let n: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT n FROM counter")
                    .get_result(conn)?;
                std::thread::sleep(Duration::from_millis(1));
                conn.batch_execute(&format!("UPDATE counter SET n = {}", n + 1))?;
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let n: i64 = a
        .read(|conn| {
            diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT n FROM counter")
                .get_result(conn)
                .map_err(DbError::from)
        })
        .await
        .unwrap();
    assert_eq!(n, 100, "every increment kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_one_instance_wakes_the_live_views_of_the_other() {
    let url = database_or_skip!("notify");
    let a = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let b = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let mut commits = b.commits();
    tokio::time::sleep(Duration::from_millis(500)).await; // the listener is connected
    commits.borrow_and_update();
    a.write(|conn| {
        conn.batch_execute("INSERT INTO processed_events VALUES ('e1', 'T', 'now')")?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), commits.changed())
        .await
        .expect("woken within 5 s")
        .unwrap();
}

/// A service with no live views (products, delivery) does not announce its commits: a
/// statement per transaction saved. Notifications reach a listener in commit order, so once
/// the announced commit made after the quiet one has arrived, an announcement of the quiet
/// one would have arrived before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_commit_notices_announces_nothing() {
    let url = database_or_skip!("quiet");
    let quiet = Database::open(&url, PLUMBING_MIGRATIONS)
        .unwrap()
        .without_commit_notices();
    let loud = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let mut listener = diesel::PgConnection::establish(&url).unwrap();
    listener.batch_execute("LISTEN mall_commits").unwrap();
    let writer_pid = |db: Database| async move {
        db.write(|conn| {
            #[derive(diesel::QueryableByName)]
            struct Pid {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                pid: i32,
            }
            let pid =
                diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result::<Pid>(conn)?;
            Ok::<_, DbError>((pid.pid, Vec::new()))
        })
        .await
    };
    let quiet_pid = writer_pid(quiet.clone()).await.unwrap();
    let loud_pid = writer_pid(loud.clone()).await.unwrap();
    let mut senders = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !senders.contains(&loud_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "no announcement of the loud commit"
        );
        listener.batch_execute("SELECT 1").unwrap(); // reads what the server sent
        for notification in listener.notifications_iter() {
            senders.push(notification.unwrap().process_id);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(quiet_pid, loud_pid);
    assert_eq!(senders, [loud_pid], "the quiet writer is {quiet_pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_split_partitions_and_fence_the_old_holder() {
    let url = database_or_skip!("leases");
    let db = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let partitions: Vec<i32> = (0..6).collect();
    let balance = |me: &str| {
        let (m, p) = (
            Membership {
                me: me.into(),
                ttl: Duration::from_secs(10),
            },
            partitions.clone(),
        );
        db.write(move |conn| Ok::<_, DbError>((m.balance(conn, "t", &p)?, Vec::new())))
    };
    assert_eq!(balance("a").await.unwrap().holds.len(), 6);
    assert!(balance("b").await.unwrap().holds.is_empty());
    assert_eq!(balance("a").await.unwrap().holds.len(), 3);
    let b = balance("b").await.unwrap();
    assert_eq!(b.holds.len(), 3);
    // The position of a partition goes only with its lease: the holder's commits, the old
    // holder's fails with NotHolder naming the lease.
    let store = |holder: &str, partition: i32| {
        let at = kafka::offsets::ConsumedAt {
            topic: "t".into(),
            partition,
            next_offset: 1,
            holder: holder.into(),
        };
        db.write(move |conn| {
            let stored = kafka::offsets::store(conn, &at);
            Ok::<_, DbError>((stored, Vec::new()))
        })
    };
    let taken = *b.holds.iter().max().expect("b holds partitions");
    store("b", taken)
        .await
        .unwrap()
        .expect("the holder stores its position");
    let stale = store("a", taken).await.unwrap();
    assert!(
        matches!(&stale, Err(DbError::NotHolder(lease)) if *lease == leases::partition_lease("t", taken)),
        "a no longer holds partition {taken}: its position must not commit, got {stale:?}"
    );
    let _ = leases::RELAY;
}

/// Two instances joining at once plan to claim the same free partitions; the one that loses a
/// claim to the other is told to balance again soon, though nobody holds a surplus it could
/// wait for (as far as it saw): else it would leave a partition unread for a whole round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_loses_a_claim_to_another_balances_again_soon() {
    let url = database_or_skip!("claims");
    let open = || Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let (holder_db, b_db, c_db) = (open(), open(), open());
    // Both joiners read the leases (none held), then wait at the lock of the first claim.
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let holder = tokio::spawn(async move {
        holder_db
            .write(move |conn| {
                kafka::db::lock(conn, Lock::Lease(&leases::partition_lease("t", 0)))?;
                let _ = hold.recv();
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let balance = |db: Database, me: &str| {
        let m = Membership {
            me: me.into(),
            ttl: Duration::from_secs(10),
        };
        tokio::spawn(async move {
            db.write(move |conn| Ok::<_, DbError>((m.balance(conn, "t", &[0, 1])?, Vec::new())))
                .await
        })
    };
    let (b, c) = (balance(b_db, "b"), balance(c_db, "c"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    let (b, c) = (b.await.unwrap().unwrap(), c.await.unwrap().unwrap());
    let (winner, loser) = if b.holds.contains(&0) { (b, c) } else { (c, b) };
    assert!(
        winner.holds.contains(&0) && !loser.holds.contains(&0),
        "{winner:?} {loser:?}"
    );
    assert!(
        loser.rebalance_soon,
        "the loser of a claim must look again soon: {loser:?}"
    );
}

/// An instance stopped inside its write transaction (SIGSTOP, a VM pause) holds the lock of
/// the order it was deciding on. Its siblings' writes about that order must fail within `lock_timeout` (transient: retried, never
/// parked) instead of waiting for ever, and once the server ends the stalled session
/// (`idle_in_transaction_session_timeout`) the lock is free and writes go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_holder_of_a_lock_costs_a_retry_not_a_hang() {
    use kafka::settings::PgLimits;
    let url = database_or_skip!("stalled");
    let limits = PgLimits {
        lock_timeout: Duration::from_millis(500),
        idle_in_transaction: Duration::from_millis(2_000),
        ..PgLimits::default()
    };
    let db = Database::open_with(&url, PLUMBING_MIGRATIONS, limits).unwrap();
    let shown: String = db
        .read(|conn| {
            diesel::dsl::sql::<diesel::sql_types::Text>("SELECT current_setting('lock_timeout')")
                .get_result(conn)
                .map_err(DbError::from)
        })
        .await
        .unwrap();
    assert_eq!(shown, "500ms", "every pooled connection carries the bounds");
    let write = || {
        db.write(|conn| {
            kafka::db::lock(conn, Lock::Order(7))?;
            conn.batch_execute(
                "INSERT INTO processed_events VALUES (gen_random_uuid()::text, 'T', 'now')",
            )?;
            Ok::<_, DbError>(((), Vec::new()))
        })
    };
    write().await.expect("a write before the stall");

    // The stalled sibling: connected like an instance, then stopped inside its transaction
    // while it holds order 7.
    let mut stalled = diesel::PgConnection::establish(&limits.with_keepalives(&url)).unwrap();
    stalled.batch_execute(&limits.session_sql()).unwrap();
    stalled
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(1, 7)")
        .unwrap();
    let began = std::time::Instant::now();
    let blocked = tokio::time::timeout(Duration::from_secs(10), write())
        .await
        .expect("a write behind a stalled lock holder must not hang");
    let waited = began.elapsed();
    let error = blocked.expect_err("the lock is held: the write cannot commit");
    assert!(
        error.is_transient(),
        "a lock timeout is retried, not parked: {error}"
    );
    assert!(waited < Duration::from_secs(2), "failed after {waited:?}");

    // The server ends the stalled session; the next write finds the lock free.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    tokio::time::timeout(Duration::from_secs(5), write())
        .await
        .expect("no hang")
        .expect("the lock was freed with the stalled session");
    assert!(
        stalled.batch_execute("COMMIT").is_err(),
        "the stalled session was ended and its transaction rolled back"
    );
}

/// Errors by class on PostgreSQL: a data exception (class 22: a NUL in text) and an integrity
/// violation (class 23) are about the data, so a consumer parks the message; a lock timeout
/// is about the moment, so it is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_errors_are_not_transient_and_lock_timeouts_are() {
    use diesel::sql_types::Text;
    let url = database_or_skip!("classes");
    let db = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let insert = |id: &'static str| {
        db.write(move |conn| {
            diesel::sql_query("INSERT INTO processed_events VALUES ($1, 'T', 'now')")
                .bind::<Text, _>(id)
                .execute(conn)?;
            Ok::<_, DbError>(((), Vec::new()))
        })
    };
    let nul = insert("a\u{0}b").await.expect_err("text cannot hold a NUL");
    assert!(!nul.is_transient(), "class 22 is the data's fault: {nul}");
    insert("once").await.unwrap();
    let twice = insert("once").await.expect_err("a duplicate key");
    assert!(
        !twice.is_transient(),
        "class 23 is the data's fault: {twice}"
    );
    let timed_out = db.write(|conn| {
        conn.batch_execute(
            "SET LOCAL lock_timeout = 1; LOCK TABLE leases IN ACCESS EXCLUSIVE MODE",
        )?;
        Ok::<_, DbError>(((), Vec::new()))
    });
    let mut other = diesel::PgConnection::establish(&url).unwrap();
    other
        .batch_execute("BEGIN; LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let timed_out = timed_out.await.expect_err("the table is locked");
    assert!(
        timed_out.is_transient(),
        "a lock timeout is retried: {timed_out}"
    );
    other.batch_execute("ROLLBACK").unwrap();
}

/// What one read shows comes from one snapshot: while writers move units between two tables
/// (stock to reservations and back, as products does), every `read_snapshot` that reads the
/// two in separate statements (a pause between them) sees the same total. Under READ
/// COMMITTED alone the second statement would see moves committed after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_read_never_mixes_two_moments() {
    use diesel::sql_types::BigInt;
    let url = database_or_skip!("snapshot");
    let db = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    db.write(|conn| {
        conn.batch_execute(
            "CREATE TABLE stock (n BIGINT NOT NULL); INSERT INTO stock VALUES (100); \
             CREATE TABLE held (n BIGINT NOT NULL); INSERT INTO held VALUES (0);",
        )?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let (db, stop) = (db.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let d = if (i + w) % 2 == 0 { 1 } else { -1 };
                i += 1;
                db.write(move |conn| {
                    conn.batch_execute(&format!(
                        "UPDATE stock SET n = n - ({d}); UPDATE held SET n = n + ({d});"
                    ))?;
                    Ok::<_, DbError>(((), Vec::new()))
                })
                .await
                .unwrap();
            }
        }));
    }
    let value = |sql: &'static str| {
        move |conn: &mut kafka::db::DbConnection| {
            diesel::dsl::sql::<BigInt>(sql).get_result::<i64>(conn)
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let total = db
            .read_snapshot(move |conn| {
                let stock = value("SELECT n FROM stock")(conn)?;
                conn.batch_execute("SELECT pg_sleep(0.01)")?;
                let held = value("SELECT n FROM held")(conn)?;
                Ok::<_, DbError>(stock + held)
            })
            .await
            .unwrap();
        seen.insert(total);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(seen, [100].into(), "every read saw one moment");
}

/// Counts the reactions to each order and causes nothing.
struct CountingReactor(std::sync::Mutex<std::collections::HashMap<i64, usize>>);

impl kafka::Reactor for CountingReactor {
    fn wants(&self, _: &events::Envelope) -> bool {
        true
    }
    fn react(
        &self,
        _: &mut kafka::db::DbConnection,
        event: &events::Envelope,
    ) -> Result<Vec<events::Envelope>, kafka::ReactError> {
        let order = event.event.order_id().unwrap_or_default();
        *self.0.lock().expect("counts").entry(order).or_default() += 1;
        Ok(Vec::new())
    }
}

/// A consumed batch records its event ids with one statement, not one per event (a round
/// trip each to a server on another host), and still applies every event once: an id
/// repeated inside the batch, and the whole batch delivered again, are duplicates.
#[tokio::test]
async fn a_batch_records_its_event_ids_in_one_statement_and_applies_each_once() {
    use events::{Envelope, Event, OrderCompleted, Service};
    use kafka::Applied;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let url = database_or_skip!("inbox_batch");
    let db = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let event = |order_id| {
        Envelope::new(
            Service::Products,
            Event::OrderCompleted(OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    };
    let mut batch: Vec<Envelope> = (1..=20).map(event).collect();
    batch.insert(10, batch[3].clone()); // a republished event inside the batch
    let reactor = Arc::new(CountingReactor(Mutex::new(Default::default())));
    let inserts = Arc::new(AtomicUsize::new(0));
    let apply = |batch: Vec<Envelope>| {
        let (reactor, inserts) = (reactor.clone(), inserts.clone());
        db.write(move |conn| {
            let counter = inserts.clone();
            conn.set_instrumentation(move |e: diesel::connection::InstrumentationEvent<'_>| {
                if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = e
                    && query
                        .to_string()
                        .contains("INSERT INTO \"processed_events\"")
                {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
            let applied = kafka::inbox::apply_all_in(conn, &*reactor, &batch);
            conn.set_instrumentation(None::<Box<dyn diesel::connection::Instrumentation>>);
            Ok::<_, kafka::ReactError>((applied?, Vec::new()))
        })
    };
    let first = apply(batch.clone()).await.unwrap();
    let outcomes: Vec<Applied> = first.iter().map(|(a, _)| *a).collect();
    let mut expected = vec![Applied::Done(0); 21];
    expected[10] = Applied::Duplicate;
    assert_eq!(outcomes, expected);
    assert_eq!(inserts.load(Ordering::SeqCst), 1, "one INSERT for 21 ids");
    let again = apply(batch).await.unwrap();
    assert!(again.iter().all(|(a, _)| *a == Applied::Duplicate));
    let counts = reactor.0.lock().unwrap().clone();
    assert_eq!(counts.len(), 20);
    assert!(
        counts.values().all(|n| *n == 1),
        "each event once: {counts:?}"
    );
}

/// Two instances write about different orders at the same moment: the second commits while
/// the first is still inside its transaction (before, one lock per service database made it
/// wait for the first's commit). About the same order, it waits and then sees the first's
/// result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_about_different_orders_run_at_once_and_about_one_order_take_turns() {
    let url = database_or_skip!("parallel");
    let a = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let b = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    different_orders_at_once_one_order_in_turns(&a, &b).await;
}

/// The same within one instance: its writer threads (`PG_WRITERS`) run side by side, so a
/// write left waiting behind a long transaction is taken by another writer and commits first
/// (with one writer it would wait for that commit), and writes about one order still take
/// turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instances_writers_commit_side_by_side() {
    let url = database_or_skip!("writers");
    let a = with_writers(&url, 2);
    different_orders_at_once_one_order_in_turns(&a, &a.clone()).await;
}

/// The plumbing's database at `url` with `writers` writer threads.
fn with_writers(url: &str, writers: usize) -> Database {
    let limits = kafka::settings::PgLimits {
        writers,
        ..kafka::settings::PgLimits::default()
    };
    Database::open_with(url, PLUMBING_MIGRATIONS, limits).expect("database with its writers")
}

/// A read-decide-write of one row of `counts`, holding its transaction open `hold` long;
/// returns when it was decided.
async fn bump(db: &Database, order: i64, hold: Duration) -> Result<std::time::Instant, DbError> {
    db.write(move |conn| {
        kafka::db::lock(conn, Lock::Order(order))?;
        let n: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
            "SELECT n FROM counts WHERE id = {order}"
        ))
        .get_result(conn)?;
        std::thread::sleep(hold);
        conn.batch_execute(&format!(
            "UPDATE counts SET n = {} WHERE id = {order}",
            n + 1
        ))?;
        Ok::<_, DbError>((std::time::Instant::now(), Vec::new()))
    })
    .await
}

/// `first` holds a write about order 1 open; `second` writes about order 2 (committed while
/// the first is in flight), then about order 1 (after the first's commit, on its result).
async fn different_orders_at_once_one_order_in_turns(first: &Database, second: &Database) {
    first
        .write(|conn| {
            conn.batch_execute(
                "CREATE TABLE counts (id BIGINT PRIMARY KEY, n BIGINT NOT NULL); \
                 INSERT INTO counts VALUES (1, 0), (2, 0)",
            )?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .expect("table made");
    let slow = {
        let first = first.clone();
        tokio::spawn(async move { bump(&first, 1, Duration::from_millis(1500)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = std::time::Instant::now();
    let other = bump(second, 2, Duration::ZERO)
        .await
        .expect("order 2 bumped");
    let same = {
        let second = second.clone();
        tokio::spawn(async move { bump(&second, 1, Duration::ZERO).await })
    };
    let slow_committed = slow.await.expect("joined").expect("order 1 bumped");
    let same_committed = same.await.expect("joined").expect("order 1 bumped again");
    assert!(
        other < slow_committed && began.elapsed() > Duration::from_millis(1000),
        "the write about order 2 committed while order 1's was in flight"
    );
    assert!(
        same_committed >= slow_committed,
        "the second write about order 1 waited for the first"
    );
    let counts: Vec<(i64, i64)> = first
        .read(|conn| {
            diesel::sql_query("SELECT id, n FROM counts ORDER BY id")
                .load::<Count>(conn)
                .map(|rows| rows.into_iter().map(|r| (r.id, r.n)).collect())
                .map_err(DbError::from)
        })
        .await
        .expect("counts read");
    assert_eq!(counts, vec![(1, 2), (2, 1)], "no update lost");
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// A partition's lease does not move while its holder has a write in flight: the fence holds
/// the lease's lock shared, the other instance's claim waits for that commit, and the old
/// holder's next write fails with `NotHolder`. (Without the shared lock the claim commits in
/// the middle, and both instances commit a position for the partition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_does_not_move_under_a_write_in_flight() {
    let url = database_or_skip!("takeover");
    let a = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let b = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let membership = |me: &str, ttl_ms: u64| Membership {
        me: me.into(),
        ttl: Duration::from_millis(ttl_ms),
    };
    let (ma, mb) = (membership("a", 300), membership("b", 10_000));
    a.write(move |conn| Ok::<_, DbError>((ma.balance(conn, "t", &[0])?, Vec::new())))
        .await
        .unwrap();
    let at = |holder: &str, next_offset: i64| kafka::offsets::ConsumedAt {
        topic: "t".into(),
        partition: 0,
        next_offset,
        holder: holder.into(),
    };
    // a's write: fenced, then 1.5 s of work; its lease expires meanwhile.
    let (at_a, at_b) = (at("a", 10), at("b", 20));
    let writer = a.clone();
    let in_flight = tokio::spawn(async move {
        writer
            .write(move |conn| {
                kafka::offsets::store(conn, &at_a)?;
                std::thread::sleep(Duration::from_millis(1500));
                Ok::<_, DbError>((std::time::Instant::now(), Vec::new()))
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let claimed = b
        .write(move |conn| {
            let balanced = mb.balance(conn, "t", &[0])?;
            Ok::<_, DbError>(((balanced, std::time::Instant::now()), Vec::new()))
        })
        .await
        .unwrap();
    let a_committed = in_flight
        .await
        .unwrap()
        .expect("a still held the lease when it fenced");
    assert!(claimed.0.holds.contains(&0), "b took the expired lease");
    assert!(
        claimed.1 >= a_committed,
        "b's claim committed only after a's write in flight"
    );
    b.write(move |conn| Ok::<_, DbError>((kafka::offsets::store(conn, &at_b)?, Vec::new())))
        .await
        .expect("the new holder stores its position");
    let stale = a
        .write(move |conn| {
            Ok::<_, DbError>((kafka::offsets::store(conn, &at("a", 11))?, Vec::new()))
        })
        .await;
    assert!(matches!(stale, Err(DbError::NotHolder(_))), "{stale:?}");
}

/// Each instance publishes the outbox rows of the partitions it holds. A write stamps each row
/// with its key's partition; a commit that wrote a row another instance publishes is announced
/// (so that instance's relay wakes at once), one that wrote only its own rows is not; and the
/// relays' fence marks a row only for the holder of its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_go_to_their_partitions_holder_who_alone_marks_them() {
    use events::{Envelope, Event, OrderCompleted, Service};
    use kafka::routing::partition_for;
    let url = database_or_skip!("routing");
    let a = Database::open(&url, PLUMBING_MIGRATIONS)
        .unwrap()
        .without_commit_notices();
    let b = Database::open(&url, PLUMBING_MIGRATIONS)
        .unwrap()
        .without_commit_notices();
    for (db, held, me) in [(&a, vec![0], "a"), (&b, vec![1, 2], "b")] {
        db.routing().set_partitions(3);
        db.routing().hold(&held.iter().copied().collect());
        let member = Membership {
            me: me.into(),
            ttl: Duration::from_secs(60),
        };
        db.write(move |conn| {
            for p in held {
                member.hold(conn, &leases::partition_lease("t", p))?;
            }
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
    }
    let order_in = |partition: i32| {
        (1..)
            .find(|o: &i64| partition_for(&o.to_string(), 3) == partition)
            .unwrap()
    };
    let event = |order_id| {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    };
    let mut listener = diesel::PgConnection::establish(&url).unwrap();
    listener.batch_execute("LISTEN mall_commits").unwrap();
    // b writes a row of its own partition 1, then one of a's partition 0.
    for order in [order_in(1), order_in(0)] {
        let events = vec![event(order)];
        b.write(move |_| Ok::<_, DbError>(((), events)))
            .await
            .unwrap();
    }
    // Then a service that announces every commit: notifications arrive in commit order, so
    // once its own has arrived, every announcement of b's two commits has too.
    let loud = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    loud.write(|_| Ok::<_, DbError>(((), Vec::new())))
        .await
        .unwrap();
    let mut payloads: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while payloads
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "announced: {payloads:?}"
        );
        listener.batch_execute("SELECT 1").unwrap(); // reads what the server sent
        for notification in listener.notifications_iter() {
            payloads.push(notification.unwrap().payload);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        payloads.len(),
        2,
        "b's commit of a's row, then the loud one: {payloads:?}"
    );

    let (stamped, marked_by_a) = a
        .write(|conn| {
            let rows = kafka::outbox::pending(conn, 10)?;
            let stamped: Vec<(String, Option<i32>)> = rows
                .iter()
                .map(|r| (r.message_key.clone(), r.topic_partition))
                .collect();
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let marked = kafka::outbox::mark_as_holder(conn, "a", "t", &ids, None)?;
            Ok::<_, DbError>(((stamped, marked), Vec::new()))
        })
        .await
        .unwrap();
    assert_eq!(
        stamped,
        [
            (order_in(1).to_string(), Some(1)),
            (order_in(0).to_string(), Some(0))
        ]
    );
    assert_eq!(marked_by_a, 1, "a marks its partition's row, not b's");
}

/// A consumer's batch of several partitions stores its positions with one fence of all their
/// leases (their locks shared in one statement): every position while each lease is held, none
/// once one moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_partitions_is_fenced_by_all_its_leases_at_once() {
    use kafka::offsets::{ConsumedAt, load, store_all};
    let url = database_or_skip!("fence_all");
    let db = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let member = Membership {
        me: "a".into(),
        ttl: Duration::from_secs(60),
    };
    db.write(move |conn| {
        for p in 0..3 {
            member.hold(conn, &leases::partition_lease("t", p))?;
        }
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    let at = |partition, next_offset| ConsumedAt {
        topic: "t".into(),
        partition,
        next_offset,
        holder: "a".into(),
    };
    let store = |ats: Vec<ConsumedAt>| {
        db.write(move |conn| {
            store_all(conn, &ats)?;
            Ok::<_, DbError>(((), Vec::new()))
        })
    };
    store(vec![at(0, 4), at(1, 5), at(2, 6)]).await.unwrap();
    db.write(|conn| {
        conn.batch_execute("UPDATE leases SET holder = 'b' WHERE name = 't/1'")?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    let refused = store(vec![at(0, 9), at(1, 9), at(2, 9)]).await;
    assert!(
        matches!(&refused, Err(DbError::NotHolder(lease)) if lease == "t/1"),
        "{refused:?}"
    );
    let positions = db
        .read(|conn| load(conn, "t").map_err(DbError::from))
        .await
        .unwrap();
    assert_eq!(
        positions,
        std::collections::BTreeMap::from([(0, 4), (1, 5), (2, 6)])
    );
}

/// Holds `db`'s only writer with a write of its own until the returned sender is used, so the
/// writes queued meanwhile share its next transaction.
async fn hold_the_writer(
    db: &Database,
) -> (
    std::sync::mpsc::Sender<()>,
    tokio::task::JoinHandle<Result<(), DbError>>,
) {
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let holder = {
        let db = db.clone();
        tokio::spawn(async move {
            db.write(move |_| {
                let _ = hold.recv();
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    (release, holder)
}

/// Writes queued behind a busy writer share its next transaction, each in a savepoint: one
/// whose statement fails (PostgreSQL then refuses every statement until the savepoint is
/// rolled back) is undone alone, and the writes before and after it commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_in_a_group_is_undone_alone() {
    let url = database_or_skip!("group");
    let db = with_writers(&url, 1);
    db.write(|conn| {
        conn.batch_execute("CREATE TABLE marks (id BIGINT PRIMARY KEY)")?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    let (release, holder) = hold_the_writer(&db).await;
    // 2 is written twice: the second fails on the primary key. Each write says which
    // transaction it ran in.
    let mut writes = Vec::new();
    for id in [1, 2, 2, 3, 4] {
        let db = db.clone();
        writes.push(tokio::spawn(async move {
            db.write(move |conn| {
                conn.batch_execute(&format!("INSERT INTO marks VALUES ({id})"))?;
                let transaction: i64 =
                    diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT txid_current()")
                        .get_result(conn)?;
                Ok::<_, DbError>((transaction, Vec::new()))
            })
            .await
        }));
        // Queued in this order behind the holder.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    let mut failed = 0;
    let mut transactions = std::collections::BTreeSet::new();
    for write in writes {
        match write.await.unwrap() {
            Ok(transaction) => {
                transactions.insert(transaction);
            }
            Err(e) => {
                assert!(
                    !e.is_transient(),
                    "a duplicate key is the write's own fault: {e}"
                );
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 1, "only the duplicate failed");
    assert_eq!(transactions.len(), 1, "the writes shared one transaction");
    let kept: Vec<i64> = db
        .read(|conn| {
            diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT id FROM marks ORDER BY id")
                .load(conn)
                .map_err(DbError::from)
        })
        .await
        .unwrap();
    assert_eq!(kept, [1, 2, 3, 4]);
}

/// A service hook that cannot record order 666's events: it asks PostgreSQL for a NUL, the
/// class-22 error a NUL that slipped past the edges would raise.
struct RefusesOrder666;

impl kafka::db::WriteHook for RefusesOrder666 {
    fn writing(
        &self,
        conn: &mut kafka::db::DbConnection,
        events: &[events::Envelope],
    ) -> diesel::QueryResult<Option<kafka::db::AfterCommit>> {
        if events.iter().any(|e| e.event.order_id() == Some(666)) {
            conn.batch_execute("SELECT chr(0)")?;
        }
        Ok(None)
    }
}

/// The events of a group's writes are recorded together before the commit. When one write's
/// cannot be (PostgreSQL then refuses every statement of the transaction), nothing commits;
/// that write gets its own error, a data error a consumer parks, and the others a transient
/// one; retried, they commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_events_cannot_be_recorded_fails_alone_and_the_others_are_retried() {
    let url = database_or_skip!("recorded");
    let db = with_writers(&url, 1).with_write_hook(std::sync::Arc::new(RefusesOrder666));
    db.write(|conn| {
        conn.batch_execute("CREATE TABLE marks (id BIGINT PRIMARY KEY)")?;
        Ok::<_, DbError>(((), Vec::new()))
    })
    .await
    .unwrap();
    let completed = |order_id| {
        let e = events::OrderCompleted {
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
        };
        events::Envelope::new(events::Service::Orders, events::Event::OrderCompleted(e))
    };
    let group = |ids: Vec<i64>| {
        let db = db.clone();
        async move {
            let (release, holder) = hold_the_writer(&db).await;
            let mut writes = Vec::new();
            for id in ids {
                let db = db.clone();
                writes.push(tokio::spawn(async move {
                    db.write(move |conn| {
                        conn.batch_execute(&format!("INSERT INTO marks VALUES ({id})"))?;
                        Ok::<_, DbError>(((), vec![completed(id)]))
                    })
                    .await
                }));
                // Queued in this order behind the holder.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            release.send(()).unwrap();
            holder.await.unwrap().unwrap();
            let mut outcomes = Vec::new();
            for write in writes {
                outcomes.push(write.await.unwrap());
            }
            outcomes
        }
    };
    let marks = || {
        db.read(|conn| {
            diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "SELECT id FROM marks UNION ALL SELECT message_key::bigint FROM outbox ORDER BY 1",
            )
            .load::<i64>(conn)
            .map_err(DbError::from)
        })
    };
    let [first, poison, last]: [Result<(), DbError>; 3] =
        group(vec![1, 666, 2]).await.try_into().unwrap();
    let poison = poison.unwrap_err();
    assert!(!poison.is_transient(), "{poison}");
    for neighbour in [first, last] {
        let e = neighbour.unwrap_err();
        assert!(matches!(e, DbError::Batch(_)) && e.is_transient(), "{e}");
    }
    assert_eq!(
        marks().await.unwrap(),
        Vec::<i64>::new(),
        "something committed"
    );
    for retried in group(vec![1, 2]).await {
        retried.unwrap();
    }
    // Each order's mark and its event's outbox row.
    assert_eq!(marks().await.unwrap(), [1, 1, 2, 2]);
}

/// The relay's connection is kept from one round to the next, untested (a checkout's test is
/// a round trip): one that died costs one failed round, and the next round gets a tested
/// connection from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_used_untested_and_replaced_after_a_failure() {
    use kafka::db::KeptConnection;
    let url = database_or_skip!("kept");
    let db = Database::open(&url, PLUMBING_MIGRATIONS).unwrap();
    let mut kept = KeptConnection::default();
    let first = pid(&db, &mut kept).await.unwrap();
    assert_eq!(
        pid(&db, &mut kept).await.unwrap(),
        first,
        "the same connection"
    );
    db.read(move |conn| {
        conn.batch_execute(&format!("SELECT pg_terminate_backend({first})"))
            .map_err(DbError::from)
    })
    .await
    .unwrap();
    // Untested: the dead connection is used, and fails.
    assert!(
        pid(&db, &mut kept).await.is_err(),
        "the kept connection died"
    );
    let next = pid(&db, &mut kept).await.unwrap();
    assert_ne!(next, first, "a new connection after the failure");
    assert_eq!(pid(&db, &mut kept).await.unwrap(), next, "kept in turn");
}

/// The server process of the connection `kept` holds (or takes).
async fn pid(db: &Database, kept: &mut kafka::db::KeptConnection) -> Result<i32, DbError> {
    db.write_alone_kept(kept, |conn| {
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>(
            "pg_backend_pid()",
        ))
        .get_result::<i32>(conn)
        .map_err(DbError::from)
    })
    .await
}
