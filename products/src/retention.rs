//! Products' retention rule: settled reservations are deleted once their last change is older
//! than the dedup window (see [`kafka::retention`] for why that is safe).
//!
//! Settled means the order's stock question is answered for good: `Released`, `Rejected`,
//! `Delivered` or `Voided`. A `Reserved` reservation still holds units that a cancel must
//! return, so it is kept however old. What an event can still do to a pruned reservation's
//! order within the window's guarantee is nothing: a late cancel finds no reservation and
//! moves no stock, just as it would have found a settled one. A product counts its reserved
//! and delivered units in its own row, so `delivered` — and stock + reserved + delivered —
//! does not change when the rows go.

use crate::saga::ReservationState;
use crate::store::schema::stock_reservations;
use diesel::prelude::*;
use kafka::db::DbConnection;
use kafka::{Deleted, PruneRule};
use std::time::Duration;

/// The states no event changes any more.
const SETTLED: [ReservationState; 4] = [
    ReservationState::Released,
    ReservationState::Rejected,
    ReservationState::Delivered,
    ReservationState::Voided,
];

/// Products' rules: settled reservations last changed more than `dedup_window` ago.
pub fn rules(dedup_window: Duration) -> Vec<PruneRule> {
    vec![PruneRule::new(
        "stock_reservations",
        dedup_window,
        prune_settled,
    )]
}

/// Deletes up to `limit` settled reservations last changed before `cutoff`.
pub fn prune_settled(conn: &mut DbConnection, cutoff: &str, limit: i64) -> QueryResult<Deleted> {
    let settled = SETTLED.map(ReservationState::as_str);
    let orders: Vec<i64> = stock_reservations::table
        .filter(stock_reservations::state.eq_any(settled))
        .filter(stock_reservations::updated_at.lt(cutoff))
        .select(stock_reservations::order_id)
        .limit(limit)
        .load(conn)?;
    let deleted = diesel::delete(
        stock_reservations::table.filter(stock_reservations::order_id.eq_any(&orders)),
    )
    .execute(conn)?;
    Ok(Deleted::rows("stock_reservations", deleted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::StockReservation;
    use crate::store::{self, NewProduct};
    use kafka::{Database, DbError};

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// Order `order_id`'s reservation of 2 units of `product_id`, in `state`, last changed
    /// `days` ago.
    fn reservation(
        conn: &mut DbConnection,
        order_id: i64,
        product_id: i64,
        state: ReservationState,
        days: u32,
    ) -> QueryResult<()> {
        let r = StockReservation {
            order_id,
            product_id,
            quantity: 2,
            state,
        };
        store::save_reservation(conn, &r)?;
        let at = kafka::retention::cutoff_at(chrono::Utc::now(), DAY * days);
        diesel::update(stock_reservations::table.find(order_id))
            .set(stock_reservations::updated_at.eq(at))
            .execute(conn)
            .map(|_| ())
    }

    #[tokio::test]
    async fn settled_old_reservations_go_and_delivered_units_stay_counted() {
        use ReservationState::{Delivered, Rejected, Released, Reserved, Voided};
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("p.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let cutoff = kafka::retention::cutoff_at(chrono::Utc::now(), DAY * 7);
        let (before, deleted, after, left) = db
            .write(move |conn| {
                let tv = NewProduct {
                    name: "TV",
                    price: 1,
                    stock: 10,
                };
                let mut product = store::insert_product(conn, &tv)?;
                // The saga's counters for the rows below: 5 reserved, 3 and 6 delivered.
                (product.reserved, product.delivered) = (2, 4);
                store::save_product(conn, &product)?;
                let id = product.id;
                // Old and settled: pruned.
                for (order, state) in [(1, Released), (2, Rejected), (3, Delivered), (4, Voided)] {
                    reservation(conn, order, id, state, 8)?;
                }
                // Reserved (however old) and recent settled ones: kept.
                reservation(conn, 5, id, Reserved, 400)?;
                reservation(conn, 6, id, Delivered, 6)?;
                reservation(conn, 7, id, Released, 6)?;
                let before = store::product(conn, id)?;
                let deleted = prune_settled(conn, &cutoff, 5_000)?;
                let after = store::product(conn, id)?;
                let left: Vec<i64> = stock_reservations::table
                    .order(stock_reservations::order_id)
                    .select(stock_reservations::order_id)
                    .load(conn)?;
                Ok::<_, DbError>(((before, deleted, after, left), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(deleted.of("stock_reservations"), 4);
        assert_eq!(left, [5, 6, 7]);
        assert_eq!(
            after, before,
            "the product's units do not change when rows go"
        );
    }
}
