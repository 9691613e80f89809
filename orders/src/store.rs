//! Orders' tables and queries: orders, each order's event history, the catalog replica.

use crate::saga::{Order, OrderState};
use diesel::prelude::*;
use events::{DeadLetterNote, DeliveryState, Envelope, ProductChanged};
use kafka::db::{DbConnection, Lock};
use kafka::prepared::{FEW_ROWS, PrepareOnce};
use serde::Serialize;
use std::collections::BTreeMap;

/// The schema, matching `migrations/`.
pub mod schema {
    diesel::table! {
        orders (id) {
            id -> BigInt,
            product_id -> BigInt,
            product_name -> Nullable<Text>,
            quantity -> BigInt,
            price -> Nullable<BigInt>,
            customer_id -> Text,
            customer_name -> Nullable<Text>,
            customer_addr -> Nullable<Text>,
            state -> Text,
            stock_reserved -> Bool,
            delivery_id -> Nullable<BigInt>,
            delivery_state -> Nullable<Text>,
            state_message -> Nullable<Text>,
            created_at -> Text,
            updated_at -> Text,
            cancel_requested -> Bool,
        }
    }

    diesel::table! {
        order_events (seq) {
            seq -> BigInt,
            order_id -> BigInt,
            event_id -> Text,
            event_type -> Text,
            source -> Text,
            causation_id -> Nullable<Text>,
            initiator -> Nullable<Text>,
            timestamp -> Text,
            payload -> Text,
        }
    }

    diesel::table! {
        products (id) {
            id -> BigInt,
            name -> Text,
            price -> BigInt,
            stock -> BigInt,
            updated_at -> Text,
        }
    }
}

use schema::{order_events, orders, products};

/// An order row.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = orders)]
#[allow(missing_docs)]
pub struct OrderRow {
    pub id: i64,
    pub product_id: i64,
    pub product_name: Option<String>,
    pub quantity: i64,
    pub price: Option<i64>,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub customer_addr: Option<String>,
    pub state: String,
    pub stock_reserved: bool,
    pub delivery_id: Option<i64>,
    pub delivery_state: Option<String>,
    pub state_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub cancel_requested: bool,
}

/// The insert form of [`OrderRow`].
#[derive(Debug, Insertable)]
#[diesel(table_name = orders)]
#[allow(missing_docs)]
pub struct NewOrder {
    pub product_id: i64,
    pub product_name: Option<String>,
    pub quantity: i64,
    pub price: Option<i64>,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub customer_addr: Option<String>,
    pub state: &'static str,
    pub created_at: String,
    pub updated_at: String,
}

#[cfg(test)]
impl NewOrder {
    /// The tests' order: one unit of product 1 for customer "c", in `state`, written at `at`.
    pub(crate) fn fixture(state: &'static str, at: String) -> Self {
        NewOrder {
            product_id: 1,
            product_name: None,
            quantity: 1,
            price: None,
            customer_id: "c".into(),
            customer_name: None,
            customer_addr: None,
            state,
            created_at: at.clone(),
            updated_at: at,
        }
    }
}

/// An order as stored, with its timestamps.
#[derive(Debug, Clone)]
pub struct StoredOrder {
    /// The saga's view of the order.
    pub order: Order,
    /// When it was placed.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

impl TryFrom<OrderRow> for StoredOrder {
    type Error = diesel::result::Error;

    fn try_from(r: OrderRow) -> Result<Self, Self::Error> {
        let corrupt = |what: String| diesel::result::Error::DeserializationError(what.into());
        let state = OrderState::parse(&r.state)
            .ok_or_else(|| corrupt(format!("unknown order state {:?}", r.state)))?;
        let delivery_state = r
            .delivery_state
            .map(|s| {
                DeliveryState::parse(&s)
                    .ok_or_else(|| corrupt(format!("unknown delivery state {s:?}")))
            })
            .transpose()?;
        Ok(StoredOrder {
            order: Order {
                id: r.id,
                product_id: r.product_id,
                product_name: r.product_name,
                quantity: r.quantity,
                price: r.price,
                customer_id: r.customer_id,
                customer_name: r.customer_name,
                customer_addr: r.customer_addr,
                state,
                stock_reserved: r.stock_reserved,
                delivery_id: r.delivery_id,
                delivery_state,
                cancel_requested: r.cancel_requested,
                state_message: r.state_message,
            },
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// Stores a new pending order, named and priced (price × quantity; none past 64 bits) from
/// the catalog replica as it is now. The replica may lag or not know the product — products
/// decides, not orders — and the order then has neither. On PostgreSQL the lookup is inside
/// the insert: one round trip per order, not two.
pub fn place_order(
    conn: &mut DbConnection,
    p: crate::domain::OrderRequest,
) -> QueryResult<StoredOrder> {
    use diesel::sql_types::{BigInt, Nullable, Text};
    let now = chrono::Utc::now().to_rfc3339();
    let DbConnection::Postgres(pg) = conn else {
        let known = replica_product(conn, p.product_id)?;
        return insert_order(
            conn,
            &NewOrder {
                product_id: p.product_id,
                product_name: known.as_ref().map(|k| k.name.clone()),
                quantity: p.quantity,
                price: known.and_then(|k| k.price.checked_mul(p.quantity)),
                customer_id: p.customer_id,
                customer_name: p.customer_name,
                customer_addr: p.customer_addr,
                state: OrderState::Placed.as_str(),
                created_at: now.clone(),
                updated_at: now,
            },
        );
    };
    let row: OrderRow = diesel::sql_query(
        "INSERT INTO orders (product_id, product_name, quantity, price, customer_id, \
             customer_name, customer_addr, state, created_at, updated_at) \
         SELECT $1, p.name, $2, \
             CASE WHEN p.price::numeric * $2 \
                 BETWEEN -9223372036854775808 AND 9223372036854775807 THEN p.price * $2 END, \
             $3, $4, $5, $6, $7, $7 \
         FROM (VALUES (1)) AS one (x) LEFT JOIN products p ON p.id = $1 \
         RETURNING *",
    )
    .bind::<BigInt, _>(p.product_id)
    .bind::<BigInt, _>(p.quantity)
    .bind::<Text, _>(p.customer_id)
    .bind::<Nullable<Text>, _>(p.customer_name)
    .bind::<Nullable<Text>, _>(p.customer_addr)
    .bind::<Text, _>(OrderState::Placed.as_str())
    .bind::<Text, _>(now)
    .prepared()
    .get_result(pg)?;
    row.try_into()
}

/// Stores a new order and returns it with its id.
pub fn insert_order(conn: &mut DbConnection, new: &NewOrder) -> QueryResult<StoredOrder> {
    // Returning a Selectable is built per backend: diesel cannot dispatch it at run time.
    let row: OrderRow = kafka::on_backend!(conn, |c| diesel::insert_into(orders::table)
        .values(new)
        .returning(OrderRow::as_returning())
        .prepared()
        .get_result(c))?;
    row.try_into()
}

/// Stores `order` under its own id (a rebuild from the topic), placed at `created_at`.
pub fn insert_order_with_id(
    conn: &mut DbConnection,
    order: &Order,
    created_at: &str,
) -> QueryResult<()> {
    let new = NewOrder {
        product_id: order.product_id,
        product_name: order.product_name.clone(),
        quantity: order.quantity,
        price: order.price,
        customer_id: order.customer_id.clone(),
        customer_name: order.customer_name.clone(),
        customer_addr: order.customer_addr.clone(),
        state: order.state.as_str(),
        created_at: created_at.to_owned(),
        updated_at: created_at.to_owned(),
    };
    diesel::insert_into(orders::table)
        .values((orders::id.eq(order.id), new))
        .execute(conn)?;
    Ok(())
}

/// Whether orders' tables hold nothing yet (no order, history or catalog entry).
pub fn is_empty(conn: &mut DbConnection) -> QueryResult<bool> {
    let orders: i64 = orders::table.count().get_result(conn)?;
    let history: i64 = order_events::table.count().get_result(conn)?;
    let catalog: i64 = products::table.count().get_result(conn)?;
    Ok(orders + history + catalog == 0)
}

/// One page of orders by id, after `after`, optionally one customer's.
pub fn list_orders(
    conn: &mut DbConnection,
    customer_id: Option<&str>,
    page: kafka::http::Page,
) -> QueryResult<Vec<StoredOrder>> {
    let mut query = orders::table
        .filter(orders::id.gt(page.after))
        .order(orders::id)
        .limit(page.limit)
        .into_boxed();
    if let Some(customer) = customer_id {
        query = query.filter(orders::customer_id.eq(customer.to_owned()));
    }
    query
        .select(OrderRow::as_select())
        .load(conn)?
        .into_iter()
        .map(StoredOrder::try_from)
        .collect()
}

/// The predicate of the partial index `orders_pending`, as SQL text. A planner uses a partial
/// index only for a query whose text holds its predicate: with `state = $1` (diesel's bind)
/// PostgreSQL's generic plan, the one a kept statement runs after five runs, read the whole
/// table.
const PENDING: &str = "state = 'OrderPlaced'";

/// The predicate of the partial index `orders_cancel_requested` (see [`PENDING`]).
const CANCEL_REQUESTED: &str = "cancel_requested";

/// How many orders are still pending (their saga not ended); the partial index
/// `orders_pending` holds exactly these.
pub fn pending_count(conn: &mut DbConnection) -> QueryResult<i64> {
    orders::table
        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(PENDING))
        .count()
        .prepared()
        .get_result(conn)
}

/// Ids of orders still pending that were placed before `cutoff` (RFC 3339), oldest first.
pub fn pending_before(conn: &mut DbConnection, cutoff: &str, limit: i64) -> QueryResult<Vec<i64>> {
    orders::table
        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(PENDING))
        .filter(orders::created_at.lt(cutoff))
        .order(orders::created_at)
        .limit(limit)
        .select(orders::id)
        .prepared()
        .load(conn)
}

/// Completed orders whose cancel request is open and was last touched before `cutoff`
/// (RFC 3339), oldest first.
pub fn cancel_requests_before(
    conn: &mut DbConnection,
    cutoff: &str,
    limit: i64,
) -> QueryResult<Vec<i64>> {
    orders::table
        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(
            CANCEL_REQUESTED,
        ))
        .filter(orders::updated_at.lt(cutoff))
        .order(orders::updated_at)
        .limit(limit)
        .select(orders::id)
        .prepared()
        .load(conn)
}

/// The orders of `ids` that exist, by id, in one statement.
pub fn orders_by_ids(
    conn: &mut DbConnection,
    ids: &[i64],
) -> QueryResult<std::collections::HashMap<i64, Order>> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    orders::table
        .filter(orders::id.eq_any(ids))
        .select(OrderRow::as_select())
        .planned_each_time()
        .load::<OrderRow>(conn)?
        .into_iter()
        .map(|row| StoredOrder::try_from(row).map(|s| (s.order.id, s.order)))
        .collect()
}

/// One order.
pub fn order(conn: &mut DbConnection, id: i64) -> QueryResult<Option<StoredOrder>> {
    orders::table
        .find(id)
        .select(OrderRow::as_select())
        .first(conn)
        .optional()?
        .map(StoredOrder::try_from)
        .transpose()
}

/// One order, for a write that decides on it: locked first ([`Lock::Order`]), so a write
/// about it on another instance waits for this one and then reads its result.
pub fn order_to_change(conn: &mut DbConnection, id: i64) -> QueryResult<Option<StoredOrder>> {
    kafka::db::lock(conn, Lock::Order(id))?;
    order(conn, id)
}

/// When each of the orders that exist was placed (`created_at`), in one statement.
pub fn placed_at_each(
    conn: &mut DbConnection,
    ids: &[i64],
) -> QueryResult<std::collections::HashMap<i64, String>> {
    Ok(orders::table
        .filter(orders::id.eq_any(ids))
        .select((orders::id, orders::created_at))
        .planned_each_time()
        .load::<(i64, String)>(conn)?
        .into_iter()
        .collect())
}

/// Whether orders completed the order at some point (its OrderCompleted is in the history;
/// a later cancel does not remove it).
pub fn was_completed(conn: &mut DbConnection, id: i64) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        order_events::table
            .filter(order_events::order_id.eq(id))
            .filter(order_events::event_type.eq("OrderCompleted"))
            .filter(order_events::source.eq(events::Service::Orders.as_str())),
    ))
    .get_result(conn)
}

/// [`save_order`] for each of `changed`: one statement on PostgreSQL, whatever their number (a
/// consumer's batch changes many orders, and a statement is a round trip there), one per
/// order on SQLite.
pub fn save_orders(conn: &mut DbConnection, changed: &[&Order]) -> QueryResult<()> {
    use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
    let (DbConnection::Postgres(pg), [_, _, ..]) = (&mut *conn, changed) else {
        return changed.iter().try_for_each(|o| save_order(conn, o));
    };
    // One array per column, the orders in the same order in each.
    let ids: Vec<i64> = changed.iter().map(|o| o.id).collect();
    let states: Vec<&str> = changed.iter().map(|o| o.state.as_str()).collect();
    let reserved: Vec<bool> = changed.iter().map(|o| o.stock_reserved).collect();
    let delivery_ids: Vec<Option<i64>> = changed.iter().map(|o| o.delivery_id).collect();
    let delivery_states: Vec<Option<&str>> = changed
        .iter()
        .map(|o| o.delivery_state.map(DeliveryState::as_str))
        .collect();
    let cancels: Vec<bool> = changed.iter().map(|o| o.cancel_requested).collect();
    let messages: Vec<Option<&str>> = changed.iter().map(|o| o.state_message.as_deref()).collect();
    diesel::sql_query(
        "UPDATE orders SET state = v.state, stock_reserved = v.stock_reserved, \
             delivery_id = v.delivery_id, delivery_state = v.delivery_state, \
             cancel_requested = v.cancel_requested, state_message = v.state_message, \
             updated_at = $8 \
         FROM unnest($1, $2, $3, $4, $5, $6, $7) \
             AS v(id, state, stock_reserved, delivery_id, delivery_state, cancel_requested, \
                  state_message) \
         WHERE orders.id = v.id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Text>, _>(states)
    .bind::<Array<Bool>, _>(reserved)
    .bind::<Array<Nullable<BigInt>>, _>(delivery_ids)
    .bind::<Array<Nullable<Text>>, _>(delivery_states)
    .bind::<Array<Bool>, _>(cancels)
    .bind::<Array<Nullable<Text>>, _>(messages)
    .bind::<Text, _>(chrono::Utc::now().to_rfc3339())
    // Planned for its rows each time: a generic plan kept from while the table was new (no
    // statistics) joins them to a scan of the whole table, and a connection keeps it for good
    // (5.8 ms a batch at 20,000 orders, a fifth of PostgreSQL's CPU at 500 sagas/s).
    .planned_each_time()
    .execute(pg)
    .map(|_| ())
}

/// Writes the saga-owned fields of an order.
pub fn save_order(conn: &mut DbConnection, o: &Order) -> QueryResult<()> {
    diesel::update(orders::table.find(o.id))
        .set((
            orders::state.eq(o.state.as_str()),
            orders::stock_reserved.eq(o.stock_reserved),
            orders::delivery_id.eq(o.delivery_id),
            orders::delivery_state.eq(o.delivery_state.map(DeliveryState::as_str)),
            orders::cancel_requested.eq(o.cancel_requested),
            orders::state_message.eq(o.state_message.as_deref()),
            orders::updated_at.eq(chrono::Utc::now().to_rfc3339()),
        ))
        .prepared()
        .execute(conn)
}

/// One entry of `GET /orders/{id}/events`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = order_events)]
#[allow(missing_docs)]
pub struct HistoryRow {
    pub seq: i64,
    pub event_type: String,
    pub source: String,
    pub event_id: String,
    pub causation_id: Option<String>,
    pub initiator: Option<String>,
    pub timestamp: String,
    pub payload: String,
}

/// Appends an event to its order's history: a consumed one as it is applied, one of orders'
/// own as it is written ([`crate::history`]). A repeat is ignored.
pub fn record_history(conn: &mut DbConnection, order_id: i64, e: &Envelope) -> QueryResult<()> {
    record_histories(conn, &[(order_id, e)])
}

/// A history row's values: the event as the history shows it.
struct HistoryValues {
    event_id: String,
    causation_id: Option<String>,
    timestamp: String,
    /// The event's fields without `eventType` (a column of its own).
    payload: String,
}

impl HistoryValues {
    fn of(e: &Envelope) -> Self {
        let mut payload = serde_json::to_value(&e.event).unwrap_or_default();
        if let Some(fields) = payload.as_object_mut() {
            fields.remove("eventType");
        }
        HistoryValues {
            event_id: e.event_id.to_string(),
            causation_id: e.causation_id.map(|id| id.to_string()),
            timestamp: e
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            payload: payload.to_string(),
        }
    }
}

/// [`record_history`] of a consumed event, then [`order`]: one statement on PostgreSQL (the
/// insert in a `WITH` clause; a statement is a round trip there), two on SQLite.
pub fn record_history_and_load(
    conn: &mut DbConnection,
    order_id: i64,
    e: &Envelope,
) -> QueryResult<Option<StoredOrder>> {
    use diesel::sql_types::{BigInt, Nullable, Text};
    let DbConnection::Postgres(pg) = conn else {
        record_history(conn, order_id, e)?;
        return order(conn, order_id);
    };
    let v = HistoryValues::of(e);
    // The SELECT does not see the row its WITH inserts (one snapshot), nor needs to.
    diesel::sql_query(
        "WITH recorded AS (INSERT INTO order_events \
             (\"order_id\", \"event_id\", \"event_type\", \"source\", \"causation_id\", \"initiator\", \
              \"timestamp\", \"payload\") \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING) \
         SELECT * FROM orders WHERE id = $1",
    )
    .bind::<BigInt, _>(order_id)
    .bind::<Text, _>(&v.event_id)
    .bind::<Text, _>(e.event_type())
    .bind::<Text, _>(e.source.as_str())
    .bind::<Nullable<Text>, _>(v.causation_id.as_deref())
    .bind::<Nullable<Text>, _>(e.initiator.map(|s| s.as_str()))
    .bind::<Text, _>(&v.timestamp)
    .bind::<Text, _>(&v.payload)
    .prepared()
    .get_result::<OrderRow>(pg)
    .optional()?
    .map(StoredOrder::try_from)
    .transpose()
}

/// Appends events to their orders' histories, in the given order, with one statement.
pub fn record_histories(conn: &mut DbConnection, events: &[(i64, &Envelope)]) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = events
        .iter()
        .map(|(order_id, e)| {
            let v = HistoryValues::of(e);
            (
                order_events::order_id.eq(*order_id),
                order_events::event_id.eq(v.event_id),
                order_events::event_type.eq(e.event_type()),
                order_events::source.eq(e.source.as_str()),
                order_events::causation_id.eq(v.causation_id),
                order_events::initiator.eq(e.initiator.map(|s| s.as_str())),
                order_events::timestamp.eq(v.timestamp),
                order_events::payload.eq(v.payload),
            )
        })
        .collect();
    let few = rows.len() <= FEW_ROWS;
    let statement = diesel::insert_into(order_events::table)
        .values(rows)
        .on_conflict_do_nothing();
    // SQLite inserts many rows one by one (diesel's own path, which keeps them).
    match conn {
        DbConnection::Postgres(c) if few => statement.prepared().execute(c),
        _ => kafka::on_backend!(conn, |c| statement.execute(c)).map(|_| ()),
    }
}

/// An order's history, oldest first.
pub fn history(conn: &mut DbConnection, order_id: i64) -> QueryResult<Vec<HistoryRow>> {
    order_events::table
        .filter(order_events::order_id.eq(order_id))
        .order(order_events::seq)
        .select(HistoryRow::as_select())
        .load(conn)
}

/// The parked events each of `order_ids` still waits on: every `EventParked` recorded in its
/// history that no `DeadLetterRedriven` or `DeadLetterDiscarded` of the same dead letter
/// (service and id) followed. Orders without one are absent.
pub fn open_parked_events(
    conn: &mut DbConnection,
    order_ids: &[i64],
) -> QueryResult<BTreeMap<i64, Vec<DeadLetterNote>>> {
    let notes: Vec<(i64, String, String)> = order_events::table
        .filter(order_events::order_id.eq_any(order_ids))
        .filter(order_events::event_type.eq_any([
            "EventParked",
            "DeadLetterRedriven",
            "DeadLetterDiscarded",
        ]))
        .order(order_events::seq)
        .select((
            order_events::order_id,
            order_events::event_type,
            order_events::payload,
        ))
        .load(conn)?;
    let mut open: BTreeMap<i64, Vec<DeadLetterNote>> = BTreeMap::new();
    for (order_id, event_type, payload) in notes {
        let Ok(note) = serde_json::from_str::<DeadLetterNote>(&payload) else {
            continue;
        };
        let waiting = open.entry(order_id).or_default();
        if event_type == "EventParked" {
            waiting.push(note);
        } else {
            waiting
                .retain(|p| (p.service, p.dead_letter_id) != (note.service, note.dead_letter_id));
        }
    }
    open.retain(|_, waiting| !waiting.is_empty());
    Ok(open)
}

/// A catalog replica entry.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = products)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct ReplicaProduct {
    pub id: i64,
    pub name: String,
    pub price: i64,
    pub stock: i64,
    pub updated_at: String,
}

/// Applies a ProductChanged to the replica.
pub fn upsert_product(conn: &mut DbConnection, p: &ProductChanged) -> QueryResult<()> {
    let now = chrono::Utc::now().to_rfc3339();
    let values = (
        products::id.eq(p.product_id),
        products::name.eq(&p.product_name),
        products::price.eq(p.product_price),
        products::stock.eq(p.product_stock),
        products::updated_at.eq(&now),
    );
    let statement = diesel::insert_into(products::table)
        .values(values)
        .on_conflict(products::id)
        .do_update()
        .set(values);
    kafka::on_backend!(conn, |c| statement.prepared().execute(c))
}

/// The replica, by id.
pub fn replica(
    conn: &mut DbConnection,
    page: kafka::http::Page,
) -> QueryResult<Vec<ReplicaProduct>> {
    products::table
        .filter(products::id.gt(page.after))
        .order(products::id)
        .limit(page.limit)
        .select(ReplicaProduct::as_select())
        .load(conn)
}

/// One replica entry.
pub fn replica_product(conn: &mut DbConnection, id: i64) -> QueryResult<Option<ReplicaProduct>> {
    products::table
        .find(id)
        .select(ReplicaProduct::as_select())
        .first(conn)
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::startup::MIGRATIONS;
    use kafka::db::Database;
    use kafka::http::Page;

    #[tokio::test]
    async fn the_catalog_replica_is_read_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let ids = db
            .write(|conn| {
                for id in 1..=5 {
                    upsert_product(
                        conn,
                        &ProductChanged {
                            product_id: id,
                            product_name: format!("p{id}"),
                            product_price: 100,
                            product_stock: 10,
                        },
                    )?;
                }
                let page = replica(conn, Page::parse(Some(2), Some(2)).unwrap())?;
                Ok::<_, kafka::db::DbError>((
                    page.iter().map(|p| p.id).collect::<Vec<_>>(),
                    Vec::new(),
                ))
            })
            .await
            .unwrap();
        assert_eq!(ids, [3, 4]);
    }
}
