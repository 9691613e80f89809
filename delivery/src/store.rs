//! Delivery's table and queries.

use crate::saga::{Delivery, DeliveryState, OrderDelivery};
use diesel::prelude::*;
use kafka::db::DbConnection;
use kafka::prepared::PrepareOnce;

/// The schema, matching `migrations/`.
pub mod schema {
    diesel::table! {
        deliveries (id) {
            id -> BigInt,
            order_id -> BigInt,
            product_id -> BigInt,
            quantity -> BigInt,
            customer_id -> Text,
            customer_name -> Nullable<Text>,
            delivery_address -> Nullable<Text>,
            delivery_state -> Text,
            order_confirmed -> Bool,
            state_message -> Nullable<Text>,
            created_at -> Text,
            updated_at -> Text,
        }
    }

    diesel::table! {
        voided_orders (order_id) {
            order_id -> BigInt,
            voided_at -> Text,
        }
    }
}

use schema::{deliveries, voided_orders};

/// A delivery row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = deliveries)]
#[allow(missing_docs)]
pub struct DeliveryRow {
    pub id: i64,
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub delivery_address: Option<String>,
    pub delivery_state: String,
    pub order_confirmed: bool,
    pub state_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// The insert-or-update form of [`DeliveryRow`].
#[derive(Debug, Insertable, AsChangeset)]
#[diesel(table_name = deliveries)]
#[allow(missing_docs)]
pub struct NewDelivery<'a> {
    pub id: i64,
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: &'a str,
    pub customer_name: Option<&'a str>,
    pub delivery_address: Option<&'a str>,
    pub delivery_state: &'a str,
    pub order_confirmed: bool,
    pub state_message: Option<&'a str>,
    pub updated_at: String,
}

impl TryFrom<DeliveryRow> for Delivery {
    type Error = diesel::result::Error;

    fn try_from(r: DeliveryRow) -> Result<Self, Self::Error> {
        let state = DeliveryState::parse(&r.delivery_state).ok_or_else(|| {
            diesel::result::Error::DeserializationError(
                format!("unknown delivery state {:?}", r.delivery_state).into(),
            )
        })?;
        Ok(Delivery {
            id: r.id,
            order_id: r.order_id,
            product_id: r.product_id,
            quantity: r.quantity,
            customer_id: r.customer_id,
            customer_name: r.customer_name,
            delivery_address: r.delivery_address,
            state,
            order_confirmed: r.order_confirmed,
            state_message: r.state_message,
        })
    }
}

fn load(rows: Vec<DeliveryRow>) -> QueryResult<Vec<Delivery>> {
    rows.into_iter().map(Delivery::try_from).collect()
}

/// One page of deliveries by id, optionally only one order's.
pub fn list(
    conn: &mut DbConnection,
    order_id: Option<i64>,
    page: kafka::http::Page,
) -> QueryResult<Vec<Delivery>> {
    let mut query = deliveries::table
        .filter(deliveries::id.gt(page.after))
        .order(deliveries::id)
        .limit(page.limit)
        .into_boxed();
    if let Some(order_id) = order_id {
        query = query.filter(deliveries::order_id.eq(order_id));
    }
    load(query.select(DeliveryRow::as_select()).load(conn)?)
}

/// One delivery.
pub fn by_id(conn: &mut DbConnection, id: i64) -> QueryResult<Option<Delivery>> {
    let row = deliveries::table
        .find(id)
        .select(DeliveryRow::as_select())
        .first(conn)
        .optional()?;
    row.map(Delivery::try_from).transpose()
}

/// What delivery knows about an order.
pub fn by_order(conn: &mut DbConnection, order_id: i64) -> QueryResult<OrderDelivery> {
    by_order_with_next_id(conn, order_id, false).map(|(delivery, _)| delivery)
}

/// What [`by_order_with_next_id`] reads in one statement: the order's delivery row, if any
/// (every column null when there is none), whether the order was voided, and the next id.
#[derive(QueryableByName)]
struct OrderDeliveryRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    id: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    order_id: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    product_id: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    quantity: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    customer_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    customer_name: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    delivery_address: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    delivery_state: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bool>)]
    order_confirmed: Option<bool>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    state_message: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    created_at: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    updated_at: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    voided: bool,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    next_id: Option<i64>,
}

/// [`by_order`] and, when `placing` (an OrderPlaced) finds neither a delivery nor a voided
/// order — the one case that starts a delivery — the id the new delivery gets ([`next_id`]),
/// all in one statement: on PostgreSQL each statement is a round trip, and this is every
/// saga's first in delivery.
pub fn by_order_with_next_id(
    conn: &mut DbConnection,
    order_id: i64,
    placing: bool,
) -> QueryResult<(OrderDelivery, Option<i64>)> {
    use diesel::sql_types::{BigInt, Bool};
    let (wanted, flag) = match conn {
        DbConnection::Postgres(_) => ("$1", "$2"),
        DbConnection::Sqlite(_) => ("?1", "?2"),
    };
    let next = next_id_sql(conn);
    // CASE evaluates only the branch it takes: no id is drawn from the sequence otherwise.
    let sql = format!(
        "SELECT d.id, d.order_id, d.product_id, d.quantity, d.customer_id, d.customer_name, \
                d.delivery_address, d.delivery_state, d.order_confirmed, d.state_message, \
                d.created_at, d.updated_at, \
                EXISTS (SELECT 1 FROM voided_orders v WHERE v.order_id = w.wanted) AS voided, \
                CASE WHEN {flag} AND d.id IS NULL \
                      AND NOT EXISTS (SELECT 1 FROM voided_orders v WHERE v.order_id = w.wanted) \
                     THEN {next} END AS next_id \
         FROM (SELECT CAST({wanted} AS BIGINT) AS wanted) w \
         LEFT JOIN deliveries d ON d.order_id = w.wanted"
    );
    let query = diesel::sql_query(sql)
        .bind::<BigInt, _>(order_id)
        .bind::<Bool, _>(placing)
        .prepared();
    let r: OrderDeliveryRow = kafka::on_backend!(conn, |c| query.get_result(c))?;
    let next_id = r.next_id;
    Ok((r.into_order_delivery()?, next_id))
}

impl OrderDeliveryRow {
    /// The order's delivery, voided mark, or nothing, as the row says.
    fn into_order_delivery(self) -> QueryResult<OrderDelivery> {
        let r = self;
        let known = match (r.id, r.order_id, r.product_id, r.quantity, r.customer_id) {
            (Some(id), Some(order_id), Some(product_id), Some(quantity), Some(customer_id)) => {
                Some(DeliveryRow {
                    id,
                    order_id,
                    product_id,
                    quantity,
                    customer_id,
                    customer_name: r.customer_name,
                    delivery_address: r.delivery_address,
                    delivery_state: r.delivery_state.unwrap_or_default(),
                    order_confirmed: r.order_confirmed.unwrap_or_default(),
                    state_message: r.state_message,
                    created_at: r.created_at.unwrap_or_default(),
                    updated_at: r.updated_at.unwrap_or_default(),
                })
            }
            _ => None,
        };
        Ok(match known {
            Some(row) => OrderDelivery::Known(Delivery::try_from(row)?),
            None if r.voided => OrderDelivery::Voided,
            None => OrderDelivery::Unknown,
        })
    }
}

/// [`by_order`] for each of `order_ids`, in one statement on PostgreSQL (a consumer's batch;
/// SQLite answers in-process, an order at a time).
pub fn by_orders(
    conn: &mut DbConnection,
    order_ids: &[i64],
) -> QueryResult<std::collections::HashMap<i64, OrderDelivery>> {
    use diesel::sql_types::{Array, BigInt};
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        wanted: i64,
        #[diesel(embed)]
        delivery: OrderDeliveryRow,
    }
    let DbConnection::Postgres(pg) = conn else {
        return order_ids
            .iter()
            .map(|&id| by_order(conn, id).map(|d| (id, d)))
            .collect();
    };
    if order_ids.is_empty() {
        return Ok(Default::default());
    }
    diesel::sql_query(
        "SELECT w.wanted, d.id, d.order_id, d.product_id, d.quantity, d.customer_id, \
                d.customer_name, d.delivery_address, d.delivery_state, d.order_confirmed, \
                d.state_message, d.created_at, d.updated_at, \
                EXISTS (SELECT 1 FROM voided_orders v WHERE v.order_id = w.wanted) AS voided, \
                CAST(NULL AS BIGINT) AS next_id \
         FROM unnest($1::bigint[]) AS w(wanted) \
         LEFT JOIN deliveries d ON d.order_id = w.wanted",
    )
    .bind::<Array<BigInt>, _>(order_ids)
    // A plan kept from the table's first minute would read all of it (see planned_each_time).
    .planned_each_time()
    .load::<Row>(pg)?
    .into_iter()
    .map(|row| Ok((row.wanted, row.delivery.into_order_delivery()?)))
    .collect()
}

/// `n` ids for new deliveries ([`next_id`]), ascending, in one statement: on PostgreSQL from
/// the sequence; on SQLite (one writer) the next `n` after the high-water mark.
pub fn next_ids(conn: &mut DbConnection, n: usize) -> QueryResult<Vec<i64>> {
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Next {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let count = i64::try_from(n).unwrap_or(i64::MAX);
    match conn {
        DbConnection::Postgres(pg) => {
            let mut ids: Vec<i64> = diesel::sql_query(
                "SELECT nextval(pg_get_serial_sequence('deliveries', 'id')) AS id \
                 FROM generate_series(1, $1)",
            )
            .bind::<BigInt, _>(count)
            .prepared()
            .load::<Next>(pg)?
            .into_iter()
            .map(|n| n.id)
            .collect();
            ids.sort_unstable();
            Ok(ids)
        }
        DbConnection::Sqlite(_) => {
            let first = next_id(conn)?;
            Ok((first..first + count).collect())
        }
    }
}

/// Remembers that an order was cancelled before its OrderPlaced arrived.
pub fn void(conn: &mut DbConnection, order_id: i64) -> QueryResult<()> {
    let statement = diesel::insert_into(voided_orders::table)
        .values((
            voided_orders::order_id.eq(order_id),
            voided_orders::voided_at.eq(chrono::Utc::now().to_rfc3339()),
        ))
        .on_conflict_do_nothing();
    kafka::on_backend!(conn, |c| statement.prepared().execute(c))
}

/// The id the next delivery gets, never one handed out before, even if that delivery was
/// deleted since (retention) or its write rolled back: PostgreSQL's sequence of the table,
/// SQLite's AUTOINCREMENT high-water mark (`sqlite_sequence`, which an insert with a larger
/// explicit id moves). Two instances starting deliveries at once draw different ids.
pub fn next_id(conn: &mut DbConnection) -> QueryResult<i64> {
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Next {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let sql = format!("SELECT {} AS id", next_id_sql(conn));
    Ok(diesel::sql_query(sql).get_result::<Next>(conn)?.id)
}

/// The SQL expression of [`next_id`], also drawn inside [`by_order_with_next_id`].
fn next_id_sql(conn: &DbConnection) -> &'static str {
    match conn {
        DbConnection::Postgres(_) => "nextval(pg_get_serial_sequence('deliveries', 'id'))",
        DbConnection::Sqlite(_) => {
            "MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'), 0), \
                 COALESCE((SELECT MAX(id) FROM deliveries), 0)) + 1"
        }
    }
}

/// The highest delivery id stored.
pub fn highest_id(conn: &mut DbConnection) -> QueryResult<Option<i64>> {
    deliveries::table
        .select(diesel::dsl::max(deliveries::id))
        .first(conn)
}

/// Moves the next delivery id past `highest` (after a rebuild inserted deliveries with the
/// ids they had on the topic).
pub fn issue_after(conn: &mut DbConnection, highest: i64) -> QueryResult<()> {
    kafka::rebuild::issue_after(conn, "deliveries", highest).map(|_| ())
}

/// One delivery, for a write that decides on it: its order locked first
/// ([`kafka::db::Lock::Order`], as the consumer locks it), then read again.
pub fn by_id_to_change(conn: &mut DbConnection, id: i64) -> QueryResult<Option<Delivery>> {
    let Some(order_id) = deliveries::table
        .find(id)
        .select(deliveries::order_id)
        .first::<i64>(conn)
        .optional()?
    else {
        return Ok(None);
    };
    kafka::db::lock(conn, kafka::db::Lock::Order(order_id))?;
    by_id(conn, id)
}

/// Inserts or updates the deliveries a consumer's batch changed: on PostgreSQL in one
/// statement for two or more (a round trip each would be the batch's longest part with the
/// server a few milliseconds away), otherwise one [`save`] each.
pub fn save_all(conn: &mut DbConnection, changed: &[&Delivery]) -> QueryResult<()> {
    use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
    let (DbConnection::Postgres(pg), [_, _, ..]) = (&mut *conn, changed) else {
        return changed.iter().try_for_each(|d| save(conn, d));
    };
    // One array per column, the deliveries in the same order in each.
    let ids: Vec<i64> = changed.iter().map(|d| d.id).collect();
    let order_ids: Vec<i64> = changed.iter().map(|d| d.order_id).collect();
    let product_ids: Vec<i64> = changed.iter().map(|d| d.product_id).collect();
    let quantities: Vec<i64> = changed.iter().map(|d| d.quantity).collect();
    let customers: Vec<&str> = changed.iter().map(|d| d.customer_id.as_str()).collect();
    let names: Vec<Option<&str>> = changed.iter().map(|d| d.customer_name.as_deref()).collect();
    let addresses: Vec<Option<&str>> = changed
        .iter()
        .map(|d| d.delivery_address.as_deref())
        .collect();
    let states: Vec<&str> = changed.iter().map(|d| d.state.as_str()).collect();
    let confirmed: Vec<bool> = changed.iter().map(|d| d.order_confirmed).collect();
    let messages: Vec<Option<&str>> = changed.iter().map(|d| d.state_message.as_deref()).collect();
    diesel::sql_query(
        "INSERT INTO deliveries (id, order_id, product_id, quantity, customer_id, \
             customer_name, delivery_address, delivery_state, order_confirmed, state_message, \
             created_at, updated_at) \
         SELECT v.*, $11, $11 FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) AS v \
         ON CONFLICT (id) DO UPDATE SET order_id = excluded.order_id, \
             product_id = excluded.product_id, quantity = excluded.quantity, \
             customer_id = excluded.customer_id, customer_name = excluded.customer_name, \
             delivery_address = excluded.delivery_address, \
             delivery_state = excluded.delivery_state, \
             order_confirmed = excluded.order_confirmed, \
             state_message = excluded.state_message, updated_at = excluded.updated_at",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(order_ids)
    .bind::<Array<BigInt>, _>(product_ids)
    .bind::<Array<BigInt>, _>(quantities)
    .bind::<Array<Text>, _>(customers)
    .bind::<Array<Nullable<Text>>, _>(names)
    .bind::<Array<Nullable<Text>>, _>(addresses)
    .bind::<Array<Text>, _>(states)
    .bind::<Array<Bool>, _>(confirmed)
    .bind::<Array<Nullable<Text>>, _>(messages)
    .bind::<Text, _>(chrono::Utc::now().to_rfc3339())
    .prepared()
    .execute(pg)
}

/// Inserts or updates a delivery.
pub fn save(conn: &mut DbConnection, d: &Delivery) -> QueryResult<()> {
    let row = NewDelivery {
        id: d.id,
        order_id: d.order_id,
        product_id: d.product_id,
        quantity: d.quantity,
        customer_id: &d.customer_id,
        customer_name: d.customer_name.as_deref(),
        delivery_address: d.delivery_address.as_deref(),
        delivery_state: d.state.as_str(),
        order_confirmed: d.order_confirmed,
        state_message: d.state_message.as_deref(),
        updated_at: chrono::Utc::now().to_rfc3339(),
    };
    let statement = diesel::insert_into(deliveries::table)
        .values((&row, deliveries::created_at.eq(&row.updated_at)))
        .on_conflict(deliveries::id)
        .do_update()
        .set(&row);
    kafka::on_backend!(conn, |c| statement.prepared().execute(c))
}

/// Whether the database holds no delivery and no voided order (a rebuild starts only then).
pub fn is_empty(conn: &mut DbConnection) -> QueryResult<bool> {
    let deliveries: i64 = deliveries::table.count().get_result(conn)?;
    let voided: i64 = voided_orders::table.count().get_result(conn)?;
    Ok(deliveries + voided == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::DeliveryState;
    use kafka::db::DbError;

    fn delivery(id: i64, order_id: i64) -> Delivery {
        Delivery {
            id,
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
            customer_name: None,
            delivery_address: None,
            state: DeliveryState::Cancelled,
            order_confirmed: false,
            state_message: None,
        }
    }

    /// The newest delivery deleted (retention, or a rebuild that never saw it): the next id is
    /// still past it. (With the highest id + 1, order 3's delivery got id 2 again.)
    #[tokio::test]
    async fn a_delivery_id_is_never_issued_twice() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("d.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        let ids = db
            .write(|conn| {
                let first = next_id(conn)?;
                save(conn, &delivery(first, 1))?;
                let second = next_id(conn)?;
                save(conn, &delivery(second, 2))?;
                diesel::delete(deliveries::table.find(second)).execute(conn)?;
                let third = next_id(conn)?;
                Ok::<_, DbError>(((first, second, third), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(ids, (1, 2, 3));
    }
}
