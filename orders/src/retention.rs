//! Orders' retention rule: settled orders, with their saga history, are deleted once their
//! last change is older than `ORDER_HISTORY_RETENTION_S` (see [`kafka::retention`] for why a
//! window at least the dedup window is safe).
//!
//! Settled means no action and no event can change the order any more:
//! - `OrderCompleted` whose delivery is `DeliveryCompleted`: delivered, so neither the
//!   customer nor the courier can cancel it;
//! - `OrderCancelled` with no delivery known, or its delivery `DeliveryCancelled`: cancelled
//!   is final, and the compensation's echo has arrived (a cancelled order whose delivery is
//!   still `DeliveryStarted` waits for delivery's DeliveryCancelled).
//!
//! and no cancel requested. A pending order, a completed one whose delivery is still under
//! way (a courier may cancel it, the customer may ask to) and one with a cancel request
//! waiting for delivery's answer are kept however old: an event for an order orders no longer
//! has would be parked.

use crate::saga::OrderState;
use crate::store::schema::{order_events, orders};
use diesel::prelude::*;
use events::DeliveryState;
use kafka::db::DbConnection;
use kafka::{Deleted, PruneRule};
use std::time::Duration;

/// The (order state, delivery state) pairs of a settled order.
const SETTLED: [(OrderState, Option<DeliveryState>); 3] = [
    (OrderState::Completed, Some(DeliveryState::Completed)),
    (OrderState::Cancelled, Some(DeliveryState::Cancelled)),
    (OrderState::Cancelled, None),
];

/// An order has about 5–8 history rows, so a batch of `limit / 8` orders deletes about
/// `limit` rows.
const HISTORY_ROWS_PER_ORDER: i64 = 8;

/// Orders' rules: settled orders last changed more than `window` ago.
pub fn rules(window: Duration) -> Vec<PruneRule> {
    vec![PruneRule::new("orders", window, prune_settled)]
}

/// Deletes up to `limit / 8` settled orders last changed before `cutoff`, with their history.
pub fn prune_settled(conn: &mut DbConnection, cutoff: &str, limit: i64) -> QueryResult<Deleted> {
    let mut ids = Vec::new();
    let orders_per_batch = (limit / HISTORY_ROWS_PER_ORDER).max(1);
    for (state, delivery) in SETTLED {
        let room = orders_per_batch - ids.len() as i64;
        if room <= 0 {
            break;
        }
        let query = orders::table
            .filter(orders::state.eq(state.as_str()))
            .filter(orders::updated_at.lt(cutoff))
            .filter(orders::cancel_requested.eq(false))
            .select(orders::id)
            .limit(room)
            .into_boxed();
        let query = match delivery {
            Some(d) => query.filter(orders::delivery_state.eq(d.as_str())),
            None => query.filter(orders::delivery_state.is_null()),
        };
        ids.extend(query.load::<i64>(conn)?);
    }
    if ids.is_empty() {
        return Ok(Deleted::default());
    }
    let history = diesel::delete(order_events::table.filter(order_events::order_id.eq_any(&ids)))
        .execute(conn)?;
    let orders = diesel::delete(orders::table.filter(orders::id.eq_any(&ids))).execute(conn)?;
    Ok(Deleted::rows("orders", orders).and("order_events", history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, NewOrder};
    use events::{Envelope, Event, OrderCompleted, Service};
    use kafka::{Database, DbError};

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// An order in `state` / `delivery` (cancel requested if asked), last changed `days` ago,
    /// with two history rows.
    fn order(
        conn: &mut DbConnection,
        state: OrderState,
        delivery: Option<DeliveryState>,
        cancel_requested: bool,
        days: u32,
    ) -> QueryResult<i64> {
        let at = kafka::retention::cutoff_at(chrono::Utc::now(), DAY * days);
        let id = store::insert_order(conn, &NewOrder::fixture(state.as_str(), at.clone()))?
            .order
            .id;
        diesel::update(orders::table.find(id))
            .set((
                orders::delivery_state.eq(delivery.map(DeliveryState::as_str)),
                orders::cancel_requested.eq(cancel_requested),
            ))
            .execute(conn)?;
        for _ in 0..2 {
            let event = Event::OrderCompleted(OrderCompleted {
                order_id: id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            });
            store::record_history(conn, id, &Envelope::new(Service::Orders, event))?;
        }
        Ok(id)
    }

    #[tokio::test]
    async fn only_settled_orders_older_than_the_window_go_with_their_history() {
        use DeliveryState::{Cancelled as DCancelled, Completed as Delivered, Started};
        use OrderState::{Cancelled, Completed, Placed};
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let (gone, kept) = db
            .write(|conn| {
                let gone = vec![
                    order(conn, Completed, Some(Delivered), false, 40)?,
                    order(conn, Cancelled, Some(DCancelled), false, 40)?,
                    order(conn, Cancelled, None, false, 40)?,
                ];
                let kept = vec![
                    // Not settled, however old.
                    order(conn, Placed, None, false, 400)?,
                    order(conn, Placed, Some(Started), false, 400)?,
                    order(conn, Completed, Some(Started), false, 400)?,
                    order(conn, Completed, Some(Delivered), true, 400)?,
                    order(conn, Completed, Some(Started), true, 400)?,
                    order(conn, Cancelled, Some(Started), false, 400)?,
                    // Settled, but recent.
                    order(conn, Completed, Some(Delivered), false, 20)?,
                    order(conn, Cancelled, None, false, 20)?,
                ];
                Ok::<_, DbError>(((gone, kept), Vec::new()))
            })
            .await
            .unwrap();
        let cutoff = kafka::retention::cutoff_at(chrono::Utc::now(), DAY * 30);
        let (deleted, left) = db
            .write(move |conn| {
                let deleted = prune_settled(conn, &cutoff, 5_000)?;
                let left: Vec<i64> = orders::table
                    .order(orders::id)
                    .select(orders::id)
                    .load(conn)?;
                let history: Vec<i64> = order_events::table
                    .order(order_events::order_id)
                    .select(order_events::order_id)
                    .distinct()
                    .load(conn)?;
                assert_eq!(left, history, "history goes with its order, and only then");
                Ok::<_, DbError>(((deleted, left), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(deleted.of("orders"), gone.len());
        assert_eq!(deleted.of("order_events"), 2 * gone.len());
        assert_eq!(left, kept);
    }

    #[tokio::test]
    async fn a_batch_takes_a_share_of_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let cutoff = kafka::retention::cutoff_at(chrono::Utc::now(), DAY * 30);
        let batches = db
            .write(move |conn| {
                for _ in 0..5 {
                    order(conn, OrderState::Cancelled, None, false, 40)?;
                }
                let mut batches = Vec::new();
                loop {
                    let n = prune_settled(conn, &cutoff, 2 * HISTORY_ROWS_PER_ORDER)?;
                    if n.total() == 0 {
                        break;
                    }
                    batches.push(n.of("orders"));
                }
                Ok::<_, DbError>((batches, Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(batches, [2, 2, 1]);
    }
}
