//! Products' tables and the queries the handlers and the reactor use.

use crate::saga::{Product, ReservationState, StockReservation};
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

/// The schema, matching `migrations/`.
pub mod schema {
    diesel::table! {
        products (id) {
            id -> BigInt,
            name -> Text,
            price -> BigInt,
            stock -> BigInt,
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
        }
    }
}

fn state_name(state: ReservationState) -> &'static str {
    match state {
        ReservationState::Reserved => "Reserved",
        ReservationState::Released => "Released",
        ReservationState::Rejected => "Rejected",
    }
}

impl TryFrom<ReservationRow> for StockReservation {
    type Error = String;

    fn try_from(r: ReservationRow) -> Result<Self, String> {
        let state = match r.state.as_str() {
            "Reserved" => ReservationState::Reserved,
            "Released" => ReservationState::Released,
            "Rejected" => ReservationState::Rejected,
            other => return Err(format!("unknown reservation state {other:?}")),
        };
        Ok(StockReservation {
            order_id: r.order_id,
            product_id: r.product_id,
            quantity: r.quantity,
            state,
        })
    }
}

/// Every product, by id.
pub fn all_products(conn: &mut SqliteConnection) -> QueryResult<Vec<Product>> {
    products::table
        .order(products::id)
        .select(ProductRow::as_select())
        .load(conn)
        .map(|rows| rows.into_iter().map(Product::from).collect())
}

/// One product.
pub fn product(conn: &mut SqliteConnection, id: i64) -> QueryResult<Option<Product>> {
    products::table
        .find(id)
        .select(ProductRow::as_select())
        .first(conn)
        .optional()
        .map(|row| row.map(Product::from))
}

/// Inserts a product and returns it with its id.
pub fn insert_product(conn: &mut SqliteConnection, new: &NewProduct<'_>) -> QueryResult<Product> {
    diesel::insert_into(products::table)
        .values(new)
        .returning(ProductRow::as_returning())
        .get_result(conn)
        .map(Product::from)
}

/// Writes a product's name, price and stock.
pub fn save_product(conn: &mut SqliteConnection, p: &Product) -> QueryResult<()> {
    diesel::update(products::table.find(p.id))
        .set((
            products::name.eq(&p.name),
            products::price.eq(p.price),
            products::stock.eq(p.stock),
        ))
        .execute(conn)
        .map(|_| ())
}

/// The reservation decided for an order, if any.
pub fn reservation(
    conn: &mut SqliteConnection,
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
pub fn save_reservation(conn: &mut SqliteConnection, r: &StockReservation) -> QueryResult<()> {
    let row = ReservationRow {
        order_id: r.order_id,
        product_id: r.product_id,
        quantity: r.quantity,
        state: state_name(r.state).to_owned(),
        updated_at: chrono::Utc::now().to_rfc3339(),
    };
    diesel::insert_into(stock_reservations::table)
        .values(&row)
        .on_conflict(stock_reservations::order_id)
        .do_update()
        .set(&row)
        .execute(conn)
        .map(|_| ())
}

/// Units held by reservations for every product that has any, in one query.
pub fn reserved_by_product(
    conn: &mut SqliteConnection,
) -> QueryResult<std::collections::HashMap<i64, i64>> {
    let held: Vec<(i64, i64)> = stock_reservations::table
        .filter(stock_reservations::state.eq("Reserved"))
        .select((stock_reservations::product_id, stock_reservations::quantity))
        .load(conn)?;
    let mut totals = std::collections::HashMap::new();
    for (product_id, quantity) in held {
        *totals.entry(product_id).or_insert(0) += quantity;
    }
    Ok(totals)
}

/// Units currently held by reservations, per product: stock + reserved stays constant under
/// the saga, whatever orders do.
pub fn reserved_units(conn: &mut SqliteConnection, product_id: i64) -> QueryResult<i64> {
    let quantities: Vec<i64> = stock_reservations::table
        .filter(stock_reservations::product_id.eq(product_id))
        .filter(stock_reservations::state.eq("Reserved"))
        .select(stock_reservations::quantity)
        .load(conn)?;
    Ok(quantities.iter().sum())
}
