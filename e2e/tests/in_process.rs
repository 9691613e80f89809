//! The three services in this process on port 0, with temporary SQLite databases (or fresh
//! PostgreSQL databases when `TEST_POSTGRES_URL` is set), against rdkafka's in-process
//! `MockCluster` broker: each test gets its own cluster.

use e2e::{InProcessMall, scenarios, spawn_in_process};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

const TOPIC: &str = "eventTopic";

async fn mall() -> (MockCluster<'static, DefaultProducerContext>, InProcessMall) {
    if std::env::var_os("RUST_LOG").is_some() {
        kafka::init_logging();
    }
    let cluster = MockCluster::new(1).expect("mock cluster");
    // The mock broker does not implement CreateTopics; the services find these and go on.
    cluster.create_topic(TOPIC, 3, 1).expect("saga topic");
    cluster
        .create_topic(&format!("{TOPIC}.DLT"), 1, 1)
        .expect("dead-letter topic");
    let mall = spawn_in_process(&cluster.bootstrap_servers(), TOPIC)
        .await
        .unwrap_or_else(|e| panic!("mall did not start: {e}"));
    (cluster, mall)
}

macro_rules! scenario {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_cluster, running) = mall().await;
            let m = &running.mall;
            if let Err(e) = $body(m).await {
                panic!("{}: {e}", stringify!($name));
            }
        }
    };
}

scenario!(happy_path, scenarios::happy_path);
scenario!(out_of_stock, scenarios::out_of_stock);
scenario!(customer_cancel, scenarios::customer_cancel);
scenario!(courier_cancel, scenarios::courier_cancel);
scenario!(
    malformed_message_is_parked,
    scenarios::malformed_message_is_parked
);
scenario!(
    delivered_order_cancel_race,
    scenarios::delivered_order_cancel_race
);
scenario!(
    bad_input_gets_clear_errors,
    scenarios::bad_input_gets_clear_errors
);
scenario!(metrics_are_exposed, scenarios::metrics_are_exposed);
scenario!(
    a_stock_write_based_on_an_old_read_is_refused,
    scenarios::a_stock_write_based_on_an_old_read_is_refused
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_twice() {
    let (_cluster, running) = mall().await;
    let m = &running.mall;
    let stop = tokio_util::sync::CancellationToken::new();
    let replayer = tokio::spawn(e2e::replay_everything_twice(
        m.brokers.clone(),
        m.topic.clone(),
        stop.clone(),
    ));
    let result = scenarios::every_event_twice(m).await;
    stop.cancel();
    let _ = replayer.await;
    if let Err(e) = result {
        panic!("every_event_twice: {e}");
    }
}

/// A topic the broker does not have reads as an error, never as an empty list (which would
/// pass every "at most once" check on no data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_missing_topic_fails() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 3, 1).expect("saga topic");
    let brokers = cluster.bootstrap_servers();
    let missing = e2e::read_topic(&brokers, "no-such-topic").await;
    assert!(missing.is_err(), "{missing:?}");
    assert_eq!(
        e2e::read_topic(&brokers, TOPIC).await.map(|m| m.len()),
        Ok(0)
    );
}

/// Runs every path of the saga — forward, out of stock, a customer's cancel, a courier's
/// cancel, a refused cancel of a delivered order — and waits until the mall is quiet: the
/// topic a rebuild reads back.
async fn every_saga_path(m: &e2e::Mall) {
    for (name, result) in [
        ("happy path", scenarios::happy_path(m).await),
        ("out of stock", scenarios::out_of_stock(m).await),
        ("customer cancel", scenarios::customer_cancel(m).await),
        ("courier cancel", scenarios::courier_cancel(m).await),
        (
            "delivered order cancel race",
            scenarios::delivered_order_cancel_race(m).await,
        ),
    ] {
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    m.wait_quiet().await.expect("quiet");
}

/// Issue 24 item 3: orders' read model — its orders, their histories and the catalog replica —
/// rebuilt from the topic (offset 0 to the end) into an empty database answers every GET as
/// the orders that lived through the sagas does: forward path, out of stock, a customer's
/// cancel (pending and confirmed), a courier's cancel, a refused cancel of a delivered order.
/// Differences the topic cannot carry are left out of the comparison: `createdAt` and
/// `updatedAt` (the times of the writes), and the order of events that arrived together in a
/// history (compared by event id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_read_model_rebuilt_from_the_topic_answers_the_same() {
    let (cluster, running) = mall().await;
    let m = &running.mall;
    every_saga_path(m).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let url = dir.path().join("rebuilt.db").to_string_lossy().into_owned();
    let kafka = kafka::KafkaSettings {
        partitions: 3,
        session_timeout: std::time::Duration::from_secs(6),
        fetch_wait_max: std::time::Duration::from_millis(10),
        instance: "orders-rebuilt".into(),
        ..kafka::KafkaSettings::new(&cluster.bootstrap_servers(), TOPIC, "orders")
    };
    let db = kafka::Database::open(&url, orders::startup::MIGRATIONS).expect("empty database");
    let rules = std::sync::Arc::new(orders::reactor::OrderReactor);
    let rebuilt = kafka::rebuild::rebuild(&db, &kafka, rules.clone())
        .await
        .expect("rebuilt");
    assert!(rebuilt.applied > 20, "{rebuilt:?}");
    let again = kafka::rebuild::rebuild(&db, &kafka, rules).await;
    assert!(
        matches!(again, Err(kafka::rebuild::RebuildError::NotEmpty)),
        "{again:?}"
    );
    drop(db);
    let host = orders::build(&orders::Settings {
        service: kafka::ServiceSettings {
            host: "127.0.0.1".into(),
            port: 0,
            database_url: url,
            kafka,
            retention: kafka::RetentionSettings::default(),
            access: kafka::access::AccessSettings::parse("127.0.0.1", "", "")
                .expect("no lists to parse"),
            tokens: kafka::auth::Tokens::default(),
            max_connections_per_address: kafka::connections::DEFAULT_MAX_PER_ADDRESS,
        },
        saga_timeout: std::time::Duration::from_secs(30),
        order_history: std::time::Duration::from_secs(30 * 24 * 3600),
        max_pending: orders::startup::MAX_PENDING_DEFAULT,
    })
    .await
    .expect("orders on the rebuilt database");
    let rebuilt_orders = format!("http://127.0.0.1:{}", host.port());
    tokio::spawn(host.run_until_stopped(std::future::pending()));

    let get = |base: String, path: String| async move {
        m.expect("GET", &format!("{base}{path}"), None, 200)
            .await
            .unwrap_or_else(|e| panic!("GET {base}{path}: {e}"))
    };
    let without_times = |mut list: serde_json::Value| {
        for item in list.as_array_mut().expect("a list") {
            let fields = item.as_object_mut().expect("an object");
            fields.remove("createdAt");
            fields.remove("updatedAt");
        }
        list
    };
    let by_event_id = |list: serde_json::Value| {
        let mut list = list.as_array().expect("a list").clone();
        list.sort_by(|a, b| a["eventId"].as_str().cmp(&b["eventId"].as_str()));
        list
    };
    let live = without_times(get(m.orders.clone(), "/orders?limit=1000".into()).await);
    let replayed = without_times(get(rebuilt_orders.clone(), "/orders?limit=1000".into()).await);
    assert!(live.as_array().is_some_and(|l| l.len() >= 6), "{live}");
    assert_eq!(live, replayed, "GET /orders");
    for order in live.as_array().expect("orders") {
        let events = format!("/orders/{}/events", order["id"]);
        assert_eq!(
            by_event_id(get(m.orders.clone(), events.clone()).await),
            by_event_id(get(rebuilt_orders.clone(), events.clone()).await),
            "GET {events}"
        );
    }
    assert_eq!(
        without_times(get(m.orders.clone(), "/products".into()).await),
        without_times(get(rebuilt_orders.clone(), "/products".into()).await),
        "GET /products (the catalog replica)"
    );
}

/// Issue 23 item 2: products and delivery rebuilt from the topic (three partitions, read in
/// whatever order the broker interleaves them) into empty databases hold exactly the catalog
/// (stock, reserved, delivered), reservations and deliveries the live services show, after
/// every path of the saga: forward, out of stock, a customer's cancel, a courier's cancel, a
/// refused cancel of a delivered order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_and_delivery_rebuilt_from_the_topic_hold_what_the_live_ones_hold() {
    let (cluster, running) = mall().await;
    let m = &running.mall;
    every_saga_path(m).await;
    let get = |url: String| async move {
        m.expect("GET", &url, None, 200)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    };
    let live = (
        get(format!("{}/products?limit=1000", m.products)).await,
        get(format!("{}/reservations?limit=1000", m.products)).await,
        get(format!("{}/deliveries?limit=1000", m.delivery)).await,
    );
    assert!(live.1.as_array().is_some_and(|l| l.len() >= 6), "{live:?}");

    let dir = tempfile::tempdir().expect("temp dir");
    let settings = |group: &str| kafka::KafkaSettings {
        partitions: 3,
        instance: format!("{group}-rebuilt"),
        ..kafka::KafkaSettings::new(&cluster.bootstrap_servers(), TOPIC, group)
    };
    let open = |name: &str, migrations| {
        let url = dir.path().join(name).to_string_lossy().into_owned();
        kafka::Database::open(&url, migrations).expect("empty database")
    };
    let page = kafka::http::Page {
        after: 0,
        limit: 1000,
    };
    let products_db = open("products.db", products::startup::MIGRATIONS);
    let stock = std::sync::Arc::new(products::reactor::StockReactor);
    kafka::rebuild::rebuild(&products_db, &settings("products"), stock)
        .await
        .expect("products rebuilt");
    let (catalog, reservations) = products_held(&products_db).await;
    let delivery_db = open("delivery.db", delivery::startup::MIGRATIONS);
    let deliveries = std::sync::Arc::new(delivery::reactor::DeliveryReactor);
    kafka::rebuild::rebuild(&delivery_db, &settings("delivery"), deliveries)
        .await
        .expect("delivery rebuilt");
    let deliveries = delivery_db
        .read(move |conn| delivery::store::list(conn, None, page).map_err(kafka::DbError::from))
        .await
        .expect("read");
    fn json(v: impl serde::Serialize) -> serde_json::Value {
        serde_json::to_value(v).expect("json")
    }
    assert_eq!(catalog, live.0, "GET /products");
    assert_eq!(reservations, live.1, "GET /reservations");
    assert_eq!(json(&deliveries), live.2, "GET /deliveries");
}

/// A new, empty database: a fresh one on `TEST_POSTGRES_URL`'s server, or a SQLite file in
/// `dir`. Its URL, so several instances can open it.
fn empty_database(dir: &tempfile::TempDir, name: &str) -> String {
    match std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        Some(server) => e2e::pg::fresh_database(&server, &e2e::pg::unique_name(name))
            .unwrap_or_else(|e| panic!("{e}")),
        None => dir
            .path()
            .join(format!("{name}.db"))
            .to_string_lossy()
            .into_owned(),
    }
}

/// Products' catalog and reservations as JSON, as its GETs show them.
async fn products_held(db: &kafka::Database) -> (serde_json::Value, serde_json::Value) {
    let page = kafka::http::Page {
        after: 0,
        limit: 1000,
    };
    let (catalog, reservations) = db
        .read(move |conn| {
            Ok::<_, kafka::DbError>((
                products::store::products_page(conn, page)?,
                products::store::reservations(conn, page)?,
            ))
        })
        .await
        .expect("read");
    (
        serde_json::to_value(catalog).expect("json"),
        serde_json::to_value(reservations).expect("json"),
    )
}

/// Products' rules, failing at the very end of a rebuild (after every event was applied):
/// a rebuild killed before it stored its positions.
struct FailingAtTheEnd;

impl kafka::inbox::Reactor for FailingAtTheEnd {
    fn wants(&self, event: &events::Envelope) -> bool {
        products::reactor::StockReactor.wants(event)
    }

    fn react(
        &self,
        conn: &mut kafka::db::DbConnection,
        event: &events::Envelope,
    ) -> Result<Vec<events::Envelope>, kafka::ReactError> {
        products::reactor::StockReactor.react(conn, event)
    }
}

impl kafka::rebuild::Rebuild for FailingAtTheEnd {
    fn service(&self) -> events::Service {
        events::Service::Products
    }

    fn is_empty(&self, conn: &mut kafka::db::DbConnection) -> diesel::QueryResult<bool> {
        products::reactor::StockReactor.is_empty(conn)
    }

    fn apply_read_back(
        &self,
        conn: &mut kafka::db::DbConnection,
        event: &events::Envelope,
    ) -> diesel::QueryResult<()> {
        products::reactor::StockReactor.apply_read_back(conn, event)
    }

    fn finish(&self, _conn: &mut kafka::db::DbConnection) -> diesel::QueryResult<()> {
        Err(diesel::result::Error::NotFound)
    }
}

/// A rebuild that fails (or is killed) before its end leaves the database empty — not half
/// rebuilt without positions, which the next start would take for a database that needs no
/// rebuild and whose consumer would then re-decide old sagas — and the next rebuild completes.
/// Also two instances rebuilding one new database at once: one rebuilds, the other waits and
/// finds it rebuilt (`NotEmpty`), and what they leave is what the live products holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_is_all_or_nothing_and_done_once_by_instances_starting_together() {
    use kafka::rebuild::{RebuildError, rebuild};
    use products::reactor::StockReactor;
    use std::sync::Arc;
    let (cluster, running) = mall().await;
    let m = &running.mall;
    every_saga_path(m).await;
    let live = (
        m.expect(
            "GET",
            &format!("{}/products?limit=1000", m.products),
            None,
            200,
        )
        .await
        .expect("GET /products"),
        m.expect(
            "GET",
            &format!("{}/reservations?limit=1000", m.products),
            None,
            200,
        )
        .await
        .expect("GET /reservations"),
    );
    let settings = |instance: &str| kafka::KafkaSettings {
        partitions: 3,
        instance: instance.into(),
        ..kafka::KafkaSettings::new(&cluster.bootstrap_servers(), TOPIC, "products")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let open = |url: &str| {
        kafka::Database::open(url, products::startup::MIGRATIONS).expect("products database")
    };

    let url = empty_database(&dir, "rebuild_failed");
    let db = open(&url);
    let failed = rebuild(&db, &settings("products-a"), Arc::new(FailingAtTheEnd)).await;
    assert!(failed.is_err(), "{failed:?}");
    let empty = db
        .read(|conn| {
            kafka::rebuild::Rebuild::is_empty(&StockReactor, conn).map_err(kafka::DbError::from)
        })
        .await
        .expect("read");
    assert!(empty, "a rebuild that failed at its end left rows behind");
    rebuild(&db, &settings("products-a"), Arc::new(StockReactor))
        .await
        .expect("the next rebuild");
    assert_eq!(
        products_held(&db).await,
        live,
        "rebuilt after a failed rebuild"
    );

    let url = empty_database(&dir, "rebuild_raced");
    let (a, b) = (open(&url), open(&url));
    let (as_a, as_b) = (settings("products-a"), settings("products-b"));
    let (first, second) = tokio::join!(
        rebuild(&a, &as_a, Arc::new(StockReactor)),
        rebuild(&b, &as_b, Arc::new(StockReactor)),
    );
    let outcomes = [&first, &second].map(|r| match r {
        Ok(_) => "rebuilt",
        Err(RebuildError::NotEmpty) => "found it rebuilt",
        Err(_) => "failed",
    });
    assert!(
        matches!(
            outcomes,
            ["rebuilt", "found it rebuilt"] | ["found it rebuilt", "rebuilt"]
        ),
        "two instances rebuilding at once: {first:?} / {second:?}"
    );
    assert_eq!(
        products_held(&a).await,
        live,
        "rebuilt by two instances at once"
    );
}

/// Orders records a consumed event in its order's history and loads the order with one
/// statement on PostgreSQL (an insert in a `WITH`): the row is recorded once however often the
/// event comes, and the order read is the stored one (on SQLite, two statements, the same).
#[tokio::test]
async fn a_consumed_event_is_recorded_and_its_order_loaded_at_once() {
    use events::{Envelope, Event, Service, StockMoved};
    let dir = tempfile::tempdir().expect("temp dir");
    let url = empty_database(&dir, "history_and_load");
    let db = kafka::Database::open(&url, orders::startup::MIGRATIONS).expect("orders database");
    let placed = db
        .write(|conn| {
            let now = chrono::Utc::now().to_rfc3339();
            let order = orders::store::insert_order(
                conn,
                &orders::store::NewOrder {
                    product_id: 1,
                    product_name: Some("TV".into()),
                    quantity: 2,
                    price: Some(100),
                    customer_id: "c".into(),
                    customer_name: Some("Kim".into()),
                    customer_addr: Some("Seoul".into()),
                    state: "OrderPlaced",
                    created_at: now.clone(),
                    updated_at: now,
                },
            )?;
            Ok::<_, kafka::DbError>((order, Vec::new()))
        })
        .await
        .expect("an order");
    let id = placed.order.id;
    let decreased = Envelope::new(
        Service::Products,
        Event::StockDecreased(StockMoved {
            order_id: id,
            product_id: 1,
            quantity: 2,
            product_stock: 8,
        }),
    );
    let on_postgres = url.starts_with("postgres");
    for _ in 0..2 {
        let event = decreased.clone();
        let (loaded, statements) = db
            .write(move |conn| {
                let (loaded, statements) = kafka::db::counting_statements(conn, |conn| {
                    orders::store::record_history_and_load(conn, id, &event)
                });
                Ok::<_, kafka::DbError>(((loaded?, statements), Vec::new()))
            })
            .await
            .expect("recorded and loaded");
        let loaded = loaded.expect("the order");
        assert_eq!(loaded.order, placed.order);
        assert_eq!(loaded.created_at, placed.created_at);
        assert_eq!(statements, if on_postgres { 1 } else { 2 });
    }
    let history = db
        .read(move |conn| orders::store::history(conn, id).map_err(kafka::DbError::from))
        .await
        .expect("history");
    let recorded: Vec<_> = history
        .iter()
        .map(|h| (h.event_type.as_str(), h.event_id.clone()))
        .collect();
    assert_eq!(
        recorded,
        [("StockDecreased", decreased.event_id.to_string())]
    );
    let missing = db
        .write(move |conn| {
            let loaded = orders::store::record_history_and_load(conn, id + 1, &decreased)?;
            Ok::<_, kafka::DbError>((loaded.is_none(), Vec::new()))
        })
        .await
        .expect("a missing order");
    assert!(missing, "an order that does not exist loads as None");
}

/// On PostgreSQL a kept statement runs on a generic plan after five runs. Orders' scans of
/// its pending orders and open cancel requests name their partial indexes' predicates in
/// their text, so even their generic plans read those indexes (with `state = $1`, most of a
/// table of ended orders matched, and each count read the whole table every 200 ms); the
/// ended sagas' placement times (`id = ANY($1)`) and the update of a batch's orders (a join
/// to unnest's rows) are planned for their rows every time, not kept: a generic plan made
/// while the table was new, which a connection keeps, scans all of it.
#[tokio::test]
async fn orders_scans_read_their_indexes_on_generic_plans() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = empty_database(&dir, "generic_plans");
    if !url.starts_with("postgres") {
        eprintln!("orders_scans_read_their_indexes_on_generic_plans: PostgreSQL only, skipped");
        return;
    }
    let db = kafka::Database::open(&url, orders::startup::MIGRATIONS).expect("orders database");
    let plans = db
        .read(|conn| {
            use diesel::connection::SimpleConnection;
            // Most orders ended, a few pending: what a running mall holds.
            conn.batch_execute(
                "INSERT INTO orders (product_id, quantity, customer_id, state, created_at, updated_at) \
                 SELECT 1, 1, 'c', CASE WHEN i % 100 = 0 THEN 'OrderPlaced' ELSE 'OrderCompleted' END, \
                        to_char(i, 'FM000000'), to_char(i, 'FM000000') \
                 FROM generate_series(1, 5000) i; \
                 ANALYZE orders; SET plan_cache_mode = force_generic_plan",
            )?;
            let stored = [100, 200].map(|id| orders::store::order(conn, id));
            let [Ok(Some(one)), Ok(Some(two))] = stored else {
                panic!("orders 100 and 200: {stored:?}");
            };
            let (ran, texts) = kafka::prepared::statements_kept(conn, |c| {
                orders::store::pending_count(c)?;
                orders::store::pending_before(c, "999999", 5)?;
                orders::store::cancel_requests_before(c, "999999", 5)?;
                let placed = orders::store::placed_at_each(c, &[100, 200])?;
                orders::store::save_orders(c, &[&one.order, &two.order])?;
                Ok::<_, diesel::result::Error>(placed)
            });
            let placed = ran?;
            let plans = generic_plans(conn, &texts)?;
            conn.batch_execute("RESET plan_cache_mode")?;
            Ok::<_, kafka::DbError>((plans, placed))
        })
        .await
        .expect("plans");
    let (plans, placed) = plans;
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert_eq!(
        plans.len(),
        3,
        "the three scans kept, the placement times and the batch update not: {plans:?}"
    );
    for (text, lines) in plans {
        assert!(
            !lines.iter().any(|l| l.contains("Seq Scan on orders")),
            "{text}\n{}",
            lines.join("\n")
        );
    }
}

/// The generic plan (`EXPLAIN`'s lines) of each statement of `texts`, as this connection
/// prepared it, whatever the values: NULL for each parameter.
fn generic_plans(
    conn: &mut kafka::db::DbConnection,
    texts: &[String],
) -> diesel::QueryResult<Vec<(String, Vec<String>)>> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    #[derive(diesel::QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        parameters: i32,
    }
    let mut plans = Vec::new();
    for text in texts {
        let prepared: Prepared = diesel::sql_query(
            "SELECT name, cardinality(parameter_types) AS parameters \
             FROM pg_prepared_statements WHERE statement = $1",
        )
        .bind::<diesel::sql_types::Text, _>(text)
        .get_result(conn)?;
        let arguments = match prepared.parameters {
            0 => String::new(),
            n => format!("({})", vec!["NULL"; n as usize].join(", ")),
        };
        let lines: Vec<Line> =
            diesel::sql_query(format!("EXPLAIN EXECUTE \"{}\"{arguments}", prepared.name))
                .load(conn)?;
        plans.push((text.clone(), lines.into_iter().map(|l| l.line).collect()));
    }
    Ok(plans)
}

/// `batches` applied once event by event and once batch by batch (`Reactor::react_all`, how
/// a consumer's batch runs on PostgreSQL), a transaction per batch, each run on a new database
/// prepared by `setup`; returns what each run caused (ids and times aside) and what `snapshot`
/// read after it.
async fn by_event_and_by_batch<R: kafka::Reactor>(
    name: &str,
    reactor: R,
    migrations: fn() -> kafka::db::Migrations,
    batches: Vec<Vec<events::Envelope>>,
    setup: fn(&mut kafka::db::DbConnection) -> Result<(), kafka::ReactError>,
    snapshot: fn(&mut kafka::db::DbConnection) -> Result<String, kafka::ReactError>,
) -> [(Vec<Vec<String>>, String); 2] {
    let reactor = std::sync::Arc::new(reactor);
    let mut outcomes = Vec::new();
    for at_once in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = empty_database(&dir, &format!("{name}_{at_once}"));
        let db = kafka::Database::open(&url, migrations()).expect("database");
        db.write(move |conn| Ok::<_, kafka::ReactError>((setup(conn)?, Vec::new())))
            .await
            .expect("the setup");
        let mut caused = Vec::new();
        for events in batches.clone() {
            let reactor = reactor.clone();
            let batch = db
                .write(move |conn| {
                    let caused = if at_once {
                        reactor.react_all(conn, &events.iter().collect::<Vec<_>>())?
                    } else {
                        events
                            .iter()
                            .map(|e| reactor.react(conn, e))
                            .collect::<Result<_, _>>()?
                    };
                    Ok::<_, kafka::ReactError>((caused, Vec::new()))
                })
                .await
                .expect("the batch");
            caused.extend(batch.into_iter().map(|c| {
                c.into_iter()
                    .map(|e| format!("{:?} {:?} {:?}", e.event, e.causation_id, e.initiator))
                    .collect()
            }));
        }
        let seen = db.read(snapshot).await.expect("the snapshot");
        outcomes.push((caused, seen));
    }
    outcomes.try_into().expect("two runs")
}

fn placed(order_id: i64, product_id: i64, quantity: i64) -> events::Envelope {
    events::Envelope::new(
        events::Service::Orders,
        events::Event::OrderPlaced(events::OrderPlaced {
            order_id,
            product_id,
            product_name: None,
            quantity,
            price: None,
            customer_id: "c".into(),
            customer_name: None,
            customer_addr: None,
        }),
    )
}

fn order_cancelled(order_id: i64, product_id: i64, quantity: i64) -> events::Envelope {
    events::Envelope::new(
        events::Service::Orders,
        events::Event::OrderCancelled(events::OrderCancelled {
            order_id,
            product_id,
            quantity,
            customer_id: "c".into(),
            state_message: "x".into(),
            reason: Some(events::CancelReason::Customer),
        }),
    )
}

/// The three services decide a consumer's batch at once with fewer statements than event by
/// event; on both backends (PostgreSQL in step 5: its one-statement reads of many rows, its
/// multi-row upserts and updates, its ids drawn many at a time) the rows and the caused events
/// are the same, over two batches, the second changing what the first stored.
#[tokio::test]
async fn a_batch_decided_at_once_matches_its_events_one_by_one() {
    use events::{DeliveryState, Envelope, Event, Service};
    let completed = |order_id| {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(events::OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    };
    let delivered = |order_id| {
        Envelope::new(
            Service::Delivery,
            Event::DeliveryCompleted(events::DeliveryCompleted {
                delivery_id: order_id,
                order_id,
                delivery_state: DeliveryState::Completed,
            }),
        )
    };
    let delivery_cancelled = |order_id, initiator| {
        let mut e = Envelope::new(
            Service::Delivery,
            Event::DeliveryCancelled(events::DeliveryCancelled {
                delivery_id: order_id,
                order_id,
                product_id: 1,
                quantity: 3,
                delivery_state: DeliveryState::Cancelled,
                state_message: "x".into(),
            }),
        );
        e.initiator = initiator;
        e
    };
    // Reservations, out of stock, an unknown product, releases, a settled delivery, a cancel
    // before its OrderPlaced, a compensation products started, a second OrderPlaced of one
    // order.
    let products_events = vec![
        placed(1, 1, 2),
        placed(2, 1, 4),
        placed(3, 2, 1),
        placed(4, 99, 1),
        order_cancelled(1, 1, 2),
    ];
    let products_later = vec![
        placed(5, 1, 3),
        delivered(3),
        order_cancelled(6, 2, 1),
        placed(6, 2, 1),
        delivery_cancelled(5, Some(Service::Products)),
        delivery_cancelled(5, None),
        placed(1, 1, 2),
        placed(7, 2, 1),
        placed(8, 1, 5),
    ];
    let [one_by_one, at_once] = by_event_and_by_batch(
        "batch_products",
        products::reactor::StockReactor,
        || products::startup::MIGRATIONS,
        vec![products_events, products_later],
        |conn| {
            for (name, stock) in [("TV", 5), ("radio", 1)] {
                products::store::insert_product(
                    conn,
                    &products::store::NewProduct {
                        name,
                        price: 1,
                        stock,
                    },
                )?;
            }
            Ok(())
        },
        |conn| {
            let page = kafka::http::Page {
                after: 0,
                limit: 100,
            };
            Ok(format!(
                "{:?} {:?}",
                products::store::products_page(conn, page)?,
                products::store::reservations(conn, page)?
            ))
        },
    )
    .await;
    assert_eq!(at_once, one_by_one, "products");
    assert!(
        one_by_one.1.contains("stock: 0, reserved: 5"),
        "{}",
        one_by_one.1
    );
    assert!(
        one_by_one.1.contains("stock: 0, reserved: 0, delivered: 1"),
        "{}",
        one_by_one.1
    );

    let cancel_requested = |order_id| {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelRequested(events::OrderCancelRequested {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                state_message: "x".into(),
            }),
        )
        .initiated_by(Service::Orders)
    };
    // Starts, a confirmation, a cancel before its OrderPlaced, a requested cancel, a repeated
    // OrderPlaced, a completion of an order delivery never saw.
    let delivery_events = vec![placed(1, 1, 1), order_cancelled(2, 1, 1), placed(3, 1, 1)];
    // The next batch changes stored deliveries (the upsert's update).
    let delivery_later = vec![
        completed(1),
        placed(2, 1, 1),
        cancel_requested(3),
        placed(1, 1, 1),
        placed(4, 1, 1),
        completed(5),
    ];
    let [one_by_one, at_once] = by_event_and_by_batch(
        "batch_delivery",
        delivery::reactor::DeliveryReactor,
        || delivery::startup::MIGRATIONS,
        vec![delivery_events, delivery_later],
        |_| Ok(()),
        |conn| {
            let deliveries = (1..=4)
                .map(|id| delivery::store::by_order(conn, id))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(format!("{deliveries:?}"))
        },
    )
    .await;
    assert_eq!(at_once, one_by_one, "delivery");
    assert!(one_by_one.1.contains("Voided"), "{}", one_by_one.1);
    // Ids in the order the deliveries started.
    for (order, id) in [(1, 1), (3, 2), (4, 3)] {
        let row = format!("id: {id}, order_id: {order},");
        assert!(one_by_one.1.contains(&row), "{}", one_by_one.1);
    }

    let stock = |order_id| {
        Envelope::new(
            Service::Products,
            Event::StockDecreased(events::StockMoved {
                order_id,
                product_id: 1,
                quantity: 1,
                product_stock: 3,
            }),
        )
    };
    let started = |order_id| {
        Envelope::new(
            Service::Delivery,
            Event::DeliveryStarted(events::DeliveryStarted {
                delivery_id: order_id,
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                customer_name: None,
                delivery_address: None,
                delivery_state: DeliveryState::Started,
            }),
        )
    };
    let changed = |product_id, stock| {
        Envelope::new(
            Service::Products,
            Event::ProductChanged(events::ProductChanged {
                product_id,
                product_name: "TV".into(),
                product_price: 1,
                product_stock: stock,
            }),
        )
    };
    let out_of_stock = |order_id| {
        Envelope::new(
            Service::Products,
            Event::ProductOutOfStock(events::ProductOutOfStock {
                order_id,
                product_id: 1,
                quantity: 1,
                product_stock: Some(0),
                state_message: "none left".into(),
            }),
        )
    };
    let courier_cancelled = |order_id| {
        Envelope::new(
            Service::Delivery,
            Event::DeliveryCancelled(events::DeliveryCancelled {
                delivery_id: order_id,
                order_id,
                product_id: 1,
                quantity: 1,
                delivery_state: DeliveryState::Cancelled,
                state_message: "courier".into(),
            }),
        )
        .initiated_by(Service::Delivery)
    };
    // A completion from both confirmations, an out-of-stock cancel, a courier's cancel after
    // a start, a repeated DeliveryStarted, ProductChanged in a row.
    let orders_events = vec![stock(1), changed(1, 9), started(1), out_of_stock(2)];
    let orders_later = vec![
        changed(2, 5),
        started(3),
        changed(1, 8),
        courier_cancelled(3),
        started(1),
    ];
    let [one_by_one, at_once] = by_event_and_by_batch(
        "batch_orders",
        orders::reactor::OrderReactor,
        || orders::startup::MIGRATIONS,
        vec![orders_events, orders_later],
        |conn| {
            for _ in 1..=3 {
                let now = chrono::Utc::now().to_rfc3339();
                orders::store::insert_order(
                    conn,
                    &orders::store::NewOrder {
                        product_id: 1,
                        product_name: None,
                        quantity: 1,
                        price: None,
                        customer_id: "c".into(),
                        customer_name: None,
                        customer_addr: None,
                        state: "OrderPlaced",
                        created_at: now.clone(),
                        updated_at: now,
                    },
                )?;
            }
            Ok(())
        },
        |conn| {
            let (mut states, mut seen) = (Vec::new(), Vec::new());
            for id in 1..=3 {
                let order = orders::store::order(conn, id)?.map(|o| o.order);
                states.push(order.as_ref().map(|o| o.state));
                let history: Vec<String> = orders::store::history(conn, id)?
                    .into_iter()
                    .map(|h| h.event_id)
                    .collect();
                seen.push(format!("{order:?} {history:?}"));
            }
            let page = kafka::http::Page {
                after: 0,
                limit: 10,
            };
            let replica: Vec<(i64, i64)> = orders::store::replica(conn, page)?
                .into_iter()
                .map(|p| (p.id, p.stock))
                .collect();
            Ok(format!("{states:?} {seen:?} {replica:?}"))
        },
    )
    .await;
    assert_eq!(at_once, one_by_one, "orders");
    assert!(
        one_by_one
            .1
            .starts_with("[Some(Completed), Some(Cancelled), Some(Cancelled)]"),
        "{}",
        one_by_one.1
    );
    assert!(
        one_by_one.1.ends_with("[(1, 8), (2, 5)]"),
        "{}",
        one_by_one.1
    );
}

/// A new order is named and priced from orders' catalog replica (on PostgreSQL inside the
/// insert), the same on both backends: price × quantity, none past 64 bits, neither for a
/// product the replica does not know.
#[tokio::test]
async fn a_placed_order_is_named_and_priced_from_the_replica() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = empty_database(&dir, "placement");
    let db = kafka::Database::open(&url, orders::startup::MIGRATIONS).expect("orders database");
    let placed = db
        .write(|conn| {
            for (id, price) in [(1, 250), (2, i64::MAX / 2 + 1)] {
                orders::store::upsert_product(
                    conn,
                    &events::ProductChanged {
                        product_id: id,
                        product_name: format!("p{id}"),
                        product_price: price,
                        product_stock: 5,
                    },
                )?;
            }
            let mut placed = Vec::new();
            for (product_id, quantity) in [(1, 3), (2, 2), (2, 1), (9, 1)] {
                let stored = orders::store::place_order(
                    conn,
                    orders::domain::OrderRequest {
                        product_id,
                        quantity,
                        customer_id: "c".into(),
                        customer_name: Some("n".into()),
                        customer_addr: None,
                    },
                )?;
                let again = orders::store::order(conn, stored.order.id)?.expect("stored");
                assert_eq!(again.order, stored.order, "returned as stored");
                placed.push(stored.order);
            }
            Ok::<_, kafka::DbError>((placed, Vec::new()))
        })
        .await
        .expect("placed");
    let seen: Vec<_> = placed
        .iter()
        .map(|o| (o.product_name.as_deref(), o.price, o.quantity, o.state))
        .collect();
    use orders::saga::OrderState::Placed;
    assert_eq!(
        seen,
        [
            (Some("p1"), Some(750), 3, Placed),
            (Some("p2"), None, 2, Placed),
            (Some("p2"), Some(i64::MAX / 2 + 1), 1, Placed),
            (None, None, 1, Placed),
        ]
    );
    assert_eq!(placed[0].customer_name.as_deref(), Some("n"));
}
