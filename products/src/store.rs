//! Products' tables and the queries the handlers and the reactor use.

use crate::saga::{Product, ReservationState, StockReservation};
use diesel::prelude::*;
use kafka::db::{DbConnection, Lock};
use kafka::prepared::PrepareOnce;

/// The schema, matching `migrations/`.
pub mod schema {
    diesel::table! {
        products (id) {
            id -> BigInt,
            name -> Text,
            price -> BigInt,
            stock -> BigInt,
            reserved -> BigInt,
            delivered -> BigInt,
        }
    }

    diesel::table! {
        stock_reservations (order_id) {
            order_id -> BigInt,
            product_id -> BigInt,
            quantity -> BigInt,
            state -> Text,
            updated_at -> Text,
        }
    }
}

use schema::{products, stock_reservations};

diesel::allow_tables_to_appear_in_same_query!(products, stock_reservations);

/// A product row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = products)]
pub struct ProductRow {
    /// See [`Product`].
    pub id: i64,
    /// See [`Product`].
    pub name: String,
    /// See [`Product`].
    pub price: i64,
    /// See [`Product`].
    pub stock: i64,
    /// See [`Product`].
    pub reserved: i64,
    /// See [`Product`].
    pub delivered: i64,
}

/// The insert form of [`ProductRow`].
#[derive(Debug, Insertable)]
#[diesel(table_name = products)]
pub struct NewProduct<'a> {
    /// Display name.
    pub name: &'a str,
    /// Unit price.
    pub price: i64,
    /// Units on hand.
    pub stock: i64,
}

/// A stock reservation row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = stock_reservations)]
pub struct ReservationRow {
    /// See [`StockReservation`].
    pub order_id: i64,
    /// See [`StockReservation`].
    pub product_id: i64,
    /// See [`StockReservation`].
    pub quantity: i64,
    /// `Reserved`, `Released` or `Rejected`.
    pub state: String,
    /// Last change.
    pub updated_at: String,
}

impl From<ProductRow> for Product {
    fn from(r: ProductRow) -> Self {
        Product {
            id: r.id,
            name: r.name,
            price: r.price,
            stock: r.stock,
            reserved: r.reserved,
            delivered: r.delivered,
        }
    }
}

impl TryFrom<ReservationRow> for StockReservation {
    type Error = String;

    fn try_from(r: ReservationRow) -> Result<Self, String> {
        let state = ReservationState::parse(&r.state)
            .ok_or_else(|| format!("unknown reservation state {:?}", r.state))?;
        Ok(StockReservation {
            order_id: r.order_id,
            product_id: r.product_id,
            quantity: r.quantity,
            state,
        })
    }
}

/// One page of products by id.
pub fn products_page(
    conn: &mut DbConnection,
    page: kafka::http::Page,
) -> QueryResult<Vec<Product>> {
    products::table
        .filter(products::id.gt(page.after))
        .order(products::id)
        .limit(page.limit)
        .select(ProductRow::as_select())
        .load(conn)
        .map(|rows| rows.into_iter().map(Product::from).collect())
}

/// One product.
pub fn product(conn: &mut DbConnection, id: i64) -> QueryResult<Option<Product>> {
    products::table
        .find(id)
        .select(ProductRow::as_select())
        .first(conn)
        .optional()
        .map(|row| row.map(Product::from))
}

/// One product, for a write that decides on its stock: locked first ([`Lock::Product`]), so
/// a write about it on another instance waits for this one and then reads its result.
pub fn product_to_change(conn: &mut DbConnection, id: i64) -> QueryResult<Option<Product>> {
    kafka::db::lock(conn, Lock::Product(id))?;
    product(conn, id)
}

/// [`product_to_change`] and, in the same statement, the order's reservation: an OrderPlaced
/// names its product before its reservation is read, so products' first statement of every
/// saga after the lock reads both (on PostgreSQL each statement is a round trip). `None` when
/// the product does not exist (the reservation is then not read).
pub fn product_to_change_with_reservation(
    conn: &mut DbConnection,
    product_id: i64,
    order_id: i64,
) -> Result<Option<(Product, Option<StockReservation>)>, kafka::ReactError> {
    kafka::db::lock(conn, Lock::Product(product_id))?;
    let row: Option<(ProductRow, Option<ReservationRow>)> = products::table
        .find(product_id)
        .left_join(stock_reservations::table.on(stock_reservations::order_id.eq(order_id)))
        .select((
            ProductRow::as_select(),
            Option::<ReservationRow>::as_select(),
        ))
        .first(conn)
        .optional()?;
    let Some((product, reservation)) = row else {
        return Ok(None);
    };
    let reservation = reservation
        .map(StockReservation::try_from)
        .transpose()
        .map_err(kafka::ReactError::Rejected)?;
    Ok(Some((Product::from(product), reservation)))
}

/// The products of `ids` that exist, for a batch that decides on their stock: all locked
/// first in one statement, then read in one ([`product_to_change`] for many).
pub fn products_to_change(
    conn: &mut DbConnection,
    ids: &std::collections::BTreeSet<i64>,
) -> QueryResult<std::collections::HashMap<i64, Product>> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    kafka::db::lock_products(conn, ids.iter().copied())?;
    let ids: Vec<i64> = ids.iter().copied().collect();
    Ok(products::table
        .filter(products::id.eq_any(ids))
        .select(ProductRow::as_select())
        .planned_each_time()
        .load(conn)?
        .into_iter()
        .map(|row| (row.id, Product::from(row)))
        .collect())
}

/// The reservations of `order_ids` that exist, in one statement (the caller holds the
/// orders' locks).
pub fn reservations_of(
    conn: &mut DbConnection,
    order_ids: &[i64],
) -> Result<std::collections::HashMap<i64, StockReservation>, kafka::ReactError> {
    if order_ids.is_empty() {
        return Ok(Default::default());
    }
    stock_reservations::table
        .filter(stock_reservations::order_id.eq_any(order_ids))
        .select(ReservationRow::as_select())
        .planned_each_time()
        .load(conn)?
        .into_iter()
        .map(|row| {
            StockReservation::try_from(row)
                .map(|r| (r.order_id, r))
                .map_err(kafka::ReactError::Rejected)
        })
        .collect()
}

/// Inserts a product and returns it with its id.
pub fn insert_product(conn: &mut DbConnection, new: &NewProduct<'_>) -> QueryResult<Product> {
    // Returning a Selectable is built per backend: diesel cannot dispatch it at run time.
    kafka::on_backend!(conn, |c| diesel::insert_into(products::table)
        .values(new)
        .returning(ProductRow::as_returning())
        .get_result(c))
    .map(Product::from)
}

/// Writes a product's name, price, stock and unit counters.
pub fn save_product(conn: &mut DbConnection, p: &Product) -> QueryResult<()> {
    diesel::update(products::table.find(p.id))
        .set((
            products::name.eq(&p.name),
            products::price.eq(p.price),
            products::stock.eq(p.stock),
            products::reserved.eq(p.reserved),
            products::delivered.eq(p.delivered),
        ))
        .prepared()
        .execute(conn)
}

/// The reservation decided for an order, if any.
pub fn reservation(
    conn: &mut DbConnection,
    order_id: i64,
) -> Result<Option<StockReservation>, kafka::ReactError> {
    let row = stock_reservations::table
        .find(order_id)
        .select(ReservationRow::as_select())
        .first(conn)
        .optional()?;
    row.map(StockReservation::try_from)
        .transpose()
        .map_err(kafka::ReactError::Rejected)
}

/// Inserts or updates an order's reservation.
pub fn save_reservation(conn: &mut DbConnection, r: &StockReservation) -> QueryResult<()> {
    let row = ReservationRow {
        order_id: r.order_id,
        product_id: r.product_id,
        quantity: r.quantity,
        state: r.state.as_str().to_owned(),
        updated_at: chrono::Utc::now().to_rfc3339(),
    };
    let statement = diesel::insert_into(stock_reservations::table)
        .values(&row)
        .on_conflict(stock_reservations::order_id)
        .do_update()
        .set(&row);
    kafka::on_backend!(conn, |c| statement.prepared().execute(c))
}

/// Inserts or updates each of `reservations` (one per order), with one statement.
pub fn save_reservations(
    conn: &mut DbConnection,
    reservations: &[&StockReservation],
) -> QueryResult<()> {
    use diesel::upsert::excluded;
    let DbConnection::Postgres(pg) = conn else {
        // SQLite answers in-process: a statement per row costs no round trip.
        return reservations
            .iter()
            .try_for_each(|r| save_reservation(conn, r));
    };
    if reservations.is_empty() {
        return Ok(());
    }
    let now = chrono::Utc::now().to_rfc3339();
    let rows: Vec<ReservationRow> = reservations
        .iter()
        .map(|r| ReservationRow {
            order_id: r.order_id,
            product_id: r.product_id,
            quantity: r.quantity,
            state: r.state.as_str().to_owned(),
            updated_at: now.clone(),
        })
        .collect();
    let statement = diesel::insert_into(stock_reservations::table)
        .values(rows)
        .on_conflict(stock_reservations::order_id)
        .do_update()
        .set((
            stock_reservations::product_id.eq(excluded(stock_reservations::product_id)),
            stock_reservations::quantity.eq(excluded(stock_reservations::quantity)),
            stock_reservations::state.eq(excluded(stock_reservations::state)),
            stock_reservations::updated_at.eq(excluded(stock_reservations::updated_at)),
        ));
    statement.execute(pg).map(|_| ())
}

/// One page of reservations by order id.
pub fn reservations(
    conn: &mut DbConnection,
    page: kafka::http::Page,
) -> QueryResult<Vec<StockReservation>> {
    stock_reservations::table
        .filter(stock_reservations::order_id.gt(page.after))
        .order(stock_reservations::order_id)
        .limit(page.limit)
        .select(ReservationRow::as_select())
        .load(conn)?
        .into_iter()
        .map(|r| {
            StockReservation::try_from(r)
                .map_err(|e| diesel::result::Error::DeserializationError(e.into()))
        })
        .collect()
}

/// Whether the database holds no product and no reservation (a rebuild starts only then).
pub fn is_empty(conn: &mut DbConnection) -> QueryResult<bool> {
    let products: i64 = products::table.count().get_result(conn)?;
    let reservations: i64 = stock_reservations::table.count().get_result(conn)?;
    Ok(products + reservations == 0)
}

/// Writes a product as a ProductChanged read back says it is (name, price, stock), inserting
/// it with its id if it is new; its unit counters are left as they are.
pub fn put_changed(conn: &mut DbConnection, p: &events::ProductChanged) -> QueryResult<()> {
    let statement = diesel::insert_into(products::table)
        .values((
            products::id.eq(p.product_id),
            products::name.eq(&p.product_name),
            products::price.eq(p.product_price),
            products::stock.eq(p.product_stock),
        ))
        .on_conflict(products::id)
        .do_update()
        .set((
            products::name.eq(&p.product_name),
            products::price.eq(p.product_price),
            products::stock.eq(p.product_stock),
        ));
    kafka::on_backend!(conn, |c| statement.execute(c)).map(|_| ())
}

/// Sets every product's `reserved` and `delivered` to the units of its `Reserved` and
/// `Delivered` reservations (a rebuild, whose reservations are all there).
pub fn recount_units(conn: &mut DbConnection) -> QueryResult<()> {
    let statement = diesel::sql_query(
        "UPDATE products SET \
         reserved = (SELECT COALESCE(SUM(quantity), 0) FROM stock_reservations r \
                     WHERE r.product_id = products.id AND r.state = 'Reserved'), \
         delivered = (SELECT COALESCE(SUM(quantity), 0) FROM stock_reservations r \
                      WHERE r.product_id = products.id AND r.state = 'Delivered')",
    );
    kafka::on_backend!(conn, |c| statement.execute(c)).map(|_| ())
}

/// The highest product id, if any.
pub fn highest_product_id(conn: &mut DbConnection) -> QueryResult<Option<i64>> {
    products::table
        .select(diesel::dsl::max(products::id))
        .first(conn)
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::migration::MigrationSource;
    use diesel::prelude::*;
    use diesel_migrations::MigrationHarness;

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Units {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        reserved: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        delivered: i64,
    }

    /// A database made before the counters gets them from its reservations (and from the
    /// units its retention archived), so an upgrade shows the same figures as before.
    #[test]
    fn the_counters_migration_counts_the_reservations_already_there() {
        let sqlite = || crate::startup::MIGRATIONS.sqlite;
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        let all = MigrationSource::<diesel::sqlite::Sqlite>::migrations(&sqlite()).unwrap();
        for _ in 0..all.len() - 1 {
            conn.run_next_migration(sqlite()).unwrap();
        }
        conn.batch_execute(
            "INSERT INTO products (id, name, price, stock, delivered_archived) \
             VALUES (1, 'TV', 1, 5, 2), (2, 'MASK', 1, 9, 0); \
             INSERT INTO stock_reservations (order_id, product_id, quantity, state, updated_at) \
             VALUES (1, 1, 3, 'Reserved', 't'), (2, 1, 4, 'Delivered', 't'), \
                    (3, 1, 1, 'Released', 't'), (4, 1, 7, 'Rejected', 't'), \
                    (5, 1, 2, 'Reserved', 't');",
        )
        .unwrap();
        conn.run_pending_migrations(sqlite()).unwrap();
        let units: Vec<Units> =
            diesel::sql_query("SELECT reserved, delivered FROM products ORDER BY id")
                .load(&mut conn)
                .unwrap();
        assert_eq!(
            units,
            [
                Units {
                    reserved: 5,
                    delivered: 6
                },
                Units {
                    reserved: 0,
                    delivered: 0
                }
            ]
        );
    }
}
