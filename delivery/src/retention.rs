//! Delivery's retention rules: finished deliveries and voided orders are deleted once their
//! last change is older than the dedup window (see [`kafka::retention`] for why that is safe).
//!
//! A `DeliveryCompleted` or `DeliveryCancelled` delivery is final: a courier cannot change it,
//! and an order event for it only repeats what is known (a cancel finds nothing to call off,
//! a cancel request is refused either way). A `DeliveryStarted` one is kept however old. A
//! voided order only has to stop a late OrderPlaced, which the window covers. The newest
//! delivery is always kept: [`crate::store::next_id`] is the highest id + 1, and deleting it
//! would hand its id out again.

use crate::saga::DeliveryState;
use crate::store::schema::{deliveries, voided_orders};
use diesel::prelude::*;
use kafka::db::DbConnection;
use kafka::{Deleted, PruneRule};
use std::time::Duration;

/// Delivery's rules: finished deliveries and voided orders older than `dedup_window`.
pub fn rules(dedup_window: Duration) -> Vec<PruneRule> {
    vec![
        PruneRule::new("deliveries", dedup_window, |conn, cutoff, limit| {
            prune_finished(conn, cutoff, limit).map(|n| Deleted::rows("deliveries", n))
        }),
        PruneRule::new("voided_orders", dedup_window, |conn, cutoff, limit| {
            prune_voided(conn, cutoff, limit).map(|n| Deleted::rows("voided_orders", n))
        }),
    ]
}

/// Deletes up to `limit` completed or cancelled deliveries last changed before `cutoff`,
/// never the newest.
pub fn prune_finished(conn: &mut DbConnection, cutoff: &str, limit: i64) -> QueryResult<usize> {
    let Some(newest) = deliveries::table
        .select(diesel::dsl::max(deliveries::id))
        .first::<Option<i64>>(conn)?
    else {
        return Ok(0);
    };
    let finished = [DeliveryState::Completed, DeliveryState::Cancelled].map(DeliveryState::as_str);
    let batch: Vec<i64> = deliveries::table
        .filter(deliveries::delivery_state.eq_any(finished))
        .filter(deliveries::updated_at.lt(cutoff))
        .filter(deliveries::id.lt(newest))
        .select(deliveries::id)
        .limit(limit)
        .load(conn)?;
    diesel::delete(deliveries::table.filter(deliveries::id.eq_any(&batch))).execute(conn)
}

/// Deletes up to `limit` voided orders recorded before `cutoff`.
pub fn prune_voided(conn: &mut DbConnection, cutoff: &str, limit: i64) -> QueryResult<usize> {
    let batch: Vec<i64> = voided_orders::table
        .filter(voided_orders::voided_at.lt(cutoff))
        .select(voided_orders::order_id)
        .limit(limit)
        .load(conn)?;
    diesel::delete(voided_orders::table.filter(voided_orders::order_id.eq_any(&batch)))
        .execute(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::Delivery;
    use crate::store;
    use kafka::{Database, DbError};

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ago(days: u32) -> String {
        kafka::retention::cutoff_at(chrono::Utc::now(), DAY * days)
    }

    /// Delivery `id` (of order `id`) in `state`, last changed `days` ago.
    fn delivery(
        conn: &mut DbConnection,
        id: i64,
        state: DeliveryState,
        days: u32,
    ) -> QueryResult<()> {
        let d = Delivery {
            id,
            order_id: id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
            customer_name: None,
            delivery_address: None,
            state,
            order_confirmed: true,
            state_message: None,
        };
        store::save(conn, &d)?;
        diesel::update(deliveries::table.find(id))
            .set(deliveries::updated_at.eq(ago(days)))
            .execute(conn)
            .map(|_| ())
    }

    fn voided(conn: &mut DbConnection, order_id: i64, days: u32) -> QueryResult<()> {
        diesel::insert_into(voided_orders::table)
            .values((
                voided_orders::order_id.eq(order_id),
                voided_orders::voided_at.eq(ago(days)),
            ))
            .execute(conn)
            .map(|_| ())
    }

    #[tokio::test]
    async fn finished_old_deliveries_and_voided_orders_go_open_and_recent_ones_stay() {
        use DeliveryState::{Cancelled, Completed, Started};
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("d.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let cutoff = ago(7);
        let (deliveries_left, voided_left, next_id) = db
            .write(move |conn| {
                delivery(conn, 1, Completed, 8)?; // pruned
                delivery(conn, 2, Cancelled, 8)?; // pruned
                delivery(conn, 3, Started, 400)?; // open: kept
                delivery(conn, 4, Completed, 6)?; // recent: kept
                delivery(conn, 5, Cancelled, 9)?; // the newest: kept for next_id
                voided(conn, 10, 8)?; // pruned
                voided(conn, 11, 6)?; // recent: kept
                assert_eq!(prune_finished(conn, &cutoff, 5_000)?, 2);
                assert_eq!(prune_voided(conn, &cutoff, 5_000)?, 1);
                assert_eq!(prune_finished(conn, &cutoff, 5_000)?, 0, "nothing left");
                let deliveries: Vec<i64> = deliveries::table
                    .order(deliveries::id)
                    .select(deliveries::id)
                    .load(conn)?;
                let voided: Vec<i64> = voided_orders::table
                    .select(voided_orders::order_id)
                    .load(conn)?;
                Ok::<_, DbError>(((deliveries, voided, store::next_id(conn)?), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(deliveries_left, [3, 4, 5]);
        assert_eq!(voided_left, [11]);
        assert_eq!(next_id, 6, "no id is handed out twice");
    }
}
