//! Gives a fresh stack's databases a history of completed orders, written straight into the
//! SQLite files while the services are stopped: per order the rows a completed saga leaves
//! (orders: the order, four timeline events, two published outbox rows, four processed event
//! ids; products: the reservation, two outbox rows, one processed id; delivery: the delivery,
//! one outbox row, two processed ids). The rows are generated inside SQLite from a series of
//! order ids, a batch per transaction, with timestamps that end a minute ago and event ids that
//! look like (and index like) random UUIDs.

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use std::path::Path;
use std::time::{Duration, Instant};

/// Orders per transaction (about 11 rows each in orders).
const BATCH: u64 = 20_000;
/// Milliseconds between two preloaded orders.
const STEP_MS: i64 = 10;
/// The stock the bench product starts with; the history's DECREASED counts down from it.
const STOCK: i64 = 100_000_000;

/// The saga's events: (kind number, eventType, source, kind of the cause).
const PLACED: Kind = Kind(1, "OrderPlaced", "orders", None);
const DECREASED: Kind = Kind(2, "StockDecreased", "products", Some(1));
const CHANGED: Kind = Kind(3, "ProductChanged", "products", Some(1));
const STARTED: Kind = Kind(4, "DeliveryStarted", "delivery", Some(1));
const COMPLETED: Kind = Kind(5, "OrderCompleted", "orders", Some(2));

/// Writes one batch's SQL for one database (the batch's orders are in `g`).
type Batch = fn(&Plan) -> String;

#[derive(Clone, Copy)]
struct Kind(u8, &'static str, &'static str, Option<u8>);

/// Fills the three databases in `dir` with orders `1..=orders` on product `product_id`, one
/// thread per database. Returns how long each took.
pub fn fill(
    dir: &Path,
    orders: u64,
    product_id: i64,
) -> Result<Vec<(&'static str, Duration)>, String> {
    let base_ms = chrono::Utc::now().timestamp_millis() - 60_000 - orders as i64 * STEP_MS;
    let plan = Plan {
        orders,
        product_id,
        base_ms,
    };
    let services: [(&'static str, Batch); 3] = [
        ("orders", orders_batch),
        ("products", products_batch),
        ("delivery", delivery_batch),
    ];
    std::thread::scope(|scope| {
        let threads: Vec<_> = services
            .iter()
            .map(|(service, batch)| {
                let path = dir.join(format!("{service}.db"));
                let plan = &plan;
                scope.spawn(move || fill_one(&path, plan, *batch).map(|took| (*service, took)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a preload thread panicked".to_owned())?
            })
            .collect()
    })
}

/// What to generate.
struct Plan {
    orders: u64,
    product_id: i64,
    base_ms: i64,
}

fn fill_one(path: &Path, plan: &Plan, batch: Batch) -> Result<Duration, String> {
    let started = Instant::now();
    let name = path.display().to_string();
    let mut conn = SqliteConnection::establish(&name).map_err(|e| format!("{name}: {e}"))?;
    let run = |conn: &mut SqliteConnection, sql: &str| {
        conn.batch_execute(sql).map_err(|e| format!("{name}: {e}"))
    };
    // Nothing else uses the file now: no durability per transaction, and no journal, so every
    // page is written once (to the file), not twice (to the WAL, then the file); WAL again after.
    run(
        &mut conn,
        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; \
         PRAGMA cache_size = -1048576; PRAGMA temp_store = MEMORY; \
         CREATE TEMP TABLE g (i INTEGER PRIMARY KEY, t INTEGER NOT NULL, \
         u1 TEXT, u2 TEXT, u3 TEXT, u4 TEXT, u5 TEXT, z1 TEXT, z2 TEXT, z3 TEXT, z4 TEXT, z5 TEXT);",
    )?;
    let mut low = 1;
    while low <= plan.orders {
        let high = (low + BATCH - 1).min(plan.orders);
        let sql = format!(
            "BEGIN; DELETE FROM g; {}; {} COMMIT;",
            series(plan, low, high),
            batch(plan)
        );
        run(&mut conn, &sql)?;
        low = high + 1;
    }
    run(&mut conn, "PRAGMA journal_mode = WAL;")?;
    Ok(started.elapsed())
}

/// Fills `g` with the batch's order ids, and per event kind its id and timestamp, computed
/// once per order rather than once per row that repeats them.
fn series(plan: &Plan, low: u64, high: u64) -> String {
    let ids: Vec<String> = (1..=5).map(uuid_of).collect();
    let times: Vec<String> = (1..=5).map(|k| at_millis(k * 8)).collect();
    format!(
        "INSERT INTO g WITH RECURSIVE s(i) AS (SELECT {low} UNION ALL SELECT i + 1 FROM s WHERE i < {high}), \
         p(i, t) AS (SELECT i, {} + i * {STEP_MS} FROM s) SELECT i, t, {}, {} FROM p",
        plan.base_ms,
        ids.join(", "),
        times.join(", ")
    )
}

fn orders_batch(plan: &Plan) -> String {
    let p = plan.product_id;
    let mut sql = format!(
        "INSERT INTO orders (id, product_id, product_name, quantity, price, customer_id, \
         customer_name, customer_addr, state, stock_reserved, delivery_id, delivery_state, \
         state_message, created_at, updated_at, cancel_requested) \
         SELECT i, {p}, 'bench', 1, 1000, {CUSTOMER}, 'Bench', 'Seoul', 'OrderCompleted', 1, i, \
         'DeliveryStarted', NULL, {}, {}, 0 FROM g;",
        at_nanos(1),
        at_nanos(5)
    );
    for kind in [PLACED, DECREASED, STARTED, COMPLETED] {
        sql += &timeline_row(plan, kind);
    }
    for kind in [PLACED, COMPLETED] {
        sql += &outbox_row(plan, kind);
    }
    for kind in [DECREASED, CHANGED, STARTED, COMPLETED] {
        sql += &processed_row(kind);
    }
    sql
}

fn products_batch(plan: &Plan) -> String {
    let mut sql = format!(
        "INSERT INTO stock_reservations (order_id, product_id, quantity, state, updated_at) \
         SELECT i, {}, 1, 'Reserved', {} FROM g;",
        plan.product_id,
        at_nanos(2)
    );
    sql += &processed_row(PLACED);
    for kind in [DECREASED, CHANGED] {
        sql += &outbox_row(plan, kind);
    }
    sql
}

fn delivery_batch(plan: &Plan) -> String {
    let mut sql = format!(
        "INSERT INTO deliveries (id, order_id, product_id, quantity, customer_id, customer_name, \
         delivery_address, delivery_state, order_confirmed, state_message, created_at, updated_at) \
         SELECT i, i, {}, 1, {CUSTOMER}, 'Bench', 'Seoul', 'DeliveryStarted', 1, NULL, {}, {} FROM g;",
        plan.product_id,
        at_nanos(4),
        at_nanos(5)
    );
    for kind in [PLACED, COMPLETED] {
        sql += &processed_row(kind);
    }
    sql += &outbox_row(plan, STARTED);
    sql
}

/// One of ten thousand customers.
const CUSTOMER: &str = "('customer' || (i % 10000) || '@12st.mall')";

/// The event id of `kind` for order `i`, shaped as the services make them (UUIDv7): the
/// event's millisecond timestamp in the first 48 bits, so ids grow with time as theirs do;
/// unique per (order, kind).
fn uuid_of(kind: u32) -> String {
    let offset = kind * 8;
    format!(
        "printf('%08x-%04x-7%03x-%04x-%012x', (t + {offset}) / 65536, (t + {offset}) % 65536, \
         {kind}, 32768 + i % 16384, i)"
    )
}

/// `t + offset` ms as the wire's timestamps: `2026-01-01T00:00:00.000Z`.
fn at_millis(offset: u32) -> String {
    format!("strftime('%Y-%m-%dT%H:%M:%fZ', (t + {offset}) / 1000.0, 'unixepoch')")
}

/// The id of event `kind` of the order, from `g`.
fn uuid(kind: u8) -> String {
    format!("u{kind}")
}

/// When event `kind` happened, as the wire writes it, from `g`.
fn at_wire(kind: u8) -> String {
    format!("z{kind}")
}

/// When event `kind` happened, as the services write row timestamps:
/// `2026-01-01T00:00:00.000000000+00:00`.
fn at_nanos(kind: u8) -> String {
    format!("(substr(z{kind}, 1, 23) || '000000+00:00')")
}

/// The event's own fields, as `json_object` arguments.
fn fields(plan: &Plan, kind: Kind) -> String {
    let p = plan.product_id;
    let stock = format!("{STOCK} - i");
    match kind.0 {
        1 => format!(
            "'orderId', i, 'productId', {p}, 'productName', 'bench', 'quantity', 1, 'price', 1000, \
             'customerId', {CUSTOMER}, 'customerName', 'Bench', 'customerAddr', 'Seoul'"
        ),
        2 => format!("'orderId', i, 'productId', {p}, 'quantity', 1, 'productStock', {stock}"),
        3 => format!(
            "'productId', {p}, 'productName', 'bench', 'productPrice', 1000, 'productStock', {stock}"
        ),
        4 => format!(
            "'deliveryId', i, 'orderId', i, 'productId', {p}, 'quantity', 1, 'customerId', {CUSTOMER}, \
             'customerName', 'Bench', 'deliveryAddress', 'Seoul', 'deliveryState', 'DeliveryStarted'"
        ),
        _ => format!("'orderId', i, 'productId', {p}, 'quantity', 1, 'customerId', {CUSTOMER}"),
    }
}

/// The causing event's id, or NULL for OrderPlaced.
fn causation(kind: Kind) -> String {
    kind.3.map_or("NULL".to_owned(), uuid)
}

/// The whole message as published: eventType, fields, envelope.
fn message(plan: &Plan, kind: Kind) -> String {
    let correlation = if kind.0 == 3 {
        "NULL"
    } else {
        "CAST(i AS TEXT)"
    };
    format!(
        "json_object('eventType', '{}', {}, 'eventId', {}, 'timestamp', {}, 'source', '{}', \
         'correlationId', {correlation}, 'causationId', {}, 'initiator', NULL)",
        kind.1,
        fields(plan, kind),
        uuid(kind.0),
        at_wire(kind.0),
        kind.2,
        causation(kind)
    )
}

fn timeline_row(plan: &Plan, kind: Kind) -> String {
    format!(
        "INSERT INTO order_events (order_id, event_id, event_type, source, causation_id, initiator, \
         timestamp, payload) SELECT i, {}, '{}', '{}', {}, NULL, {}, json_object({}) FROM g ORDER BY 2;",
        uuid(kind.0),
        kind.1,
        kind.2,
        causation(kind),
        at_wire(kind.0),
        fields(plan, kind)
    )
}

fn outbox_row(plan: &Plan, kind: Kind) -> String {
    let key = if kind.0 == 3 {
        format!("'{}'", plan.product_id)
    } else {
        "CAST(i AS TEXT)".to_owned()
    };
    format!(
        "INSERT INTO outbox (event_id, event_type, message_key, payload, created_at, published_at, \
         topic, error) SELECT {}, '{}', {key}, {}, {}, {}, NULL, NULL FROM g ORDER BY 1;",
        uuid(kind.0),
        kind.1,
        message(plan, kind),
        at_nanos(kind.0),
        at_nanos(kind.0)
    )
}

fn processed_row(kind: Kind) -> String {
    format!(
        "INSERT INTO processed_events (event_id, event_type, processed_at) SELECT {}, '{}', {} FROM g ORDER BY 1;",
        uuid(kind.0),
        kind.1,
        at_nanos(kind.0)
    )
}
