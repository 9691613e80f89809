//! Products' tables and the queries the handlers and the reactor use.

use crate::saga::{Product, ReservationState, StockReservation};
use diesel::prelude::*;
use kafka::db::DbConnection;

/// The schema, matching `migrations/`.
pub mod schema {
    diesel::table! {
        products (id) {
            id -> BigInt,
            name -> Text,
            price -> BigInt,
            stock -> BigInt,
            delivered_archived -> BigInt,
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

/// Every product, by id.
pub fn all_products(conn: &mut DbConnection) -> QueryResult<Vec<Product>> {
    products::table
        .order(products::id)
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

/// Inserts a product and returns it with its id.
pub fn insert_product(conn: &mut DbConnection, new: &NewProduct<'_>) -> QueryResult<Product> {
    // Returning a Selectable is built per backend: diesel cannot dispatch it at run time.
    kafka::on_backend!(conn, |c| diesel::insert_into(products::table)
        .values(new)
        .returning(ProductRow::as_returning())
        .get_result(c))
    .map(Product::from)
}

/// Writes a product's name, price and stock.
pub fn save_product(conn: &mut DbConnection, p: &Product) -> QueryResult<()> {
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
    kafka::on_backend!(conn, |c| statement.execute(c)).map(|_| ())
}

/// Units a product has out of stock: held for orders in flight, and delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Reserved for orders not yet delivered (or cancelled).
    pub reserved: i64,
    /// Gone with completed deliveries.
    pub delivered: i64,
}

/// [`Committed`] units for every product that has any, in two queries.
pub fn committed_by_product(
    conn: &mut DbConnection,
) -> QueryResult<std::collections::HashMap<i64, Committed>> {
    let archived: Vec<(i64, i64)> = products::table
        .filter(products::delivered_archived.gt(0))
        .select((products::id, products::delivered_archived))
        .load(conn)?;
    let held: Vec<(i64, String, i64)> = stock_reservations::table
        .filter(stock_reservations::state.eq_any(["Reserved", "Delivered"]))
        .select((
            stock_reservations::product_id,
            stock_reservations::state,
            stock_reservations::quantity,
        ))
        .load(conn)?;
    let mut totals = std::collections::HashMap::<i64, Committed>::new();
    for (product_id, units) in archived {
        totals.entry(product_id).or_default().delivered += units;
    }
    for (product_id, state, quantity) in held {
        let t = totals.entry(product_id).or_default();
        if state == "Reserved" {
            t.reserved += quantity;
        } else {
            t.delivered += quantity;
        }
    }
    Ok(totals)
}

/// [`Committed`] units of one product: stock + reserved + delivered stays constant under the
/// saga, whatever orders do (delivered counts the pruned reservations too).
pub fn committed_units(conn: &mut DbConnection, product_id: i64) -> QueryResult<Committed> {
    let archived: i64 = products::table
        .find(product_id)
        .select(products::delivered_archived)
        .first(conn)
        .optional()?
        .unwrap_or(0);
    let held: Vec<(String, i64)> = stock_reservations::table
        .filter(stock_reservations::product_id.eq(product_id))
        .filter(stock_reservations::state.eq_any(["Reserved", "Delivered"]))
        .select((stock_reservations::state, stock_reservations::quantity))
        .load(conn)?;
    let mut t = Committed {
        delivered: archived,
        ..Committed::default()
    };
    for (state, quantity) in held {
        if state == "Reserved" {
            t.reserved += quantity;
        } else {
            t.delivered += quantity;
        }
    }
    Ok(t)
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
