//! The saga timeout's I/O shell: every second, orders still pending after `SAGA_TIMEOUT_S` are
//! cancelled by [`crate::saga::time_out`], each in its own transaction with its OrderCancelled.

use crate::{saga, store};
use kafka::{Database, DbError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Orders cancelled per pass at most; the next pass takes the rest.
const BATCH: i64 = 200;

/// Cancels pending orders older than `timeout` until `stop`.
pub async fn run(db: Database, timeout: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = pass(&db, timeout).await {
            log::warn!("saga timeout: {e}; trying again in a second");
        }
    }
}

/// One pass; returns how many orders it cancelled.
pub async fn pass(db: &Database, timeout: Duration) -> Result<usize, DbError> {
    let cutoff = cutoff(timeout);
    let due = {
        let cutoff = cutoff.clone();
        db.read(move |conn| store::pending_before(conn, &cutoff, BATCH).map_err(DbError::from))
            .await?
    };
    let mut cancelled = 0;
    for id in due {
        let cutoff = cutoff.clone();
        let secs = timeout.as_secs();
        let done = db
            .write(move |conn| {
                // Re-read under the write lock: a confirmation may have just completed it.
                let Some(mut stored) = store::order(conn, id)? else {
                    return Ok((false, Vec::new()));
                };
                if stored.created_at >= cutoff {
                    return Ok((false, Vec::new()));
                }
                let Some((order, event)) = saga::time_out(stored.order, secs) else {
                    return Ok((false, Vec::new()));
                };
                store::save_order(conn, &order)?;
                stored.order = order;
                Ok::<_, DbError>((true, vec![event]))
            })
            .await?;
        if done {
            log::info!(
                "order {id}: no confirmation within {} s, cancelled",
                timeout.as_secs()
            );
            cancelled += 1;
        }
    }
    Ok(cancelled)
}

fn cutoff(timeout: Duration) -> String {
    let age = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    (chrono::Utc::now() - age).to_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::OrderState;
    use crate::store::NewOrder;

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;

    fn new_order(created_at: String) -> NewOrder {
        NewOrder::fixture(OrderState::Placed.as_str(), created_at)
    }

    #[tokio::test]
    async fn only_pending_orders_older_than_the_timeout_are_cancelled_with_their_event() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let old = (chrono::Utc::now() - chrono::Duration::seconds(60)).to_rfc3339();
        let new = chrono::Utc::now().to_rfc3339();
        let ids = db
            .write(move |conn| {
                let stale = store::insert_order(conn, &new_order(old.clone()))?.order.id;
                let fresh = store::insert_order(conn, &new_order(new))?.order.id;
                let done = store::insert_order(conn, &new_order(old))?.order;
                let mut completed = done.clone();
                completed.state = OrderState::Completed;
                store::save_order(conn, &completed)?;
                Ok::<_, DbError>(((stale, fresh, done.id), Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(pass(&db, Duration::from_secs(30)).await.unwrap(), 1);
        assert_eq!(pass(&db, Duration::from_secs(30)).await.unwrap(), 0, "once");
        let (states, pending) = db
            .read(move |conn| {
                let mut state = |id| -> Result<OrderState, DbError> {
                    store::order(conn, id)?
                        .map(|s| s.order.state)
                        .ok_or_else(|| DbError::Task(format!("order {id} is gone")))
                };
                let states = (state(ids.0)?, state(ids.1)?, state(ids.2)?);
                Ok::<_, DbError>((states, kafka::outbox::pending(conn, 10)?))
            })
            .await
            .unwrap();
        assert_eq!(
            states,
            (
                OrderState::Cancelled,
                OrderState::Placed,
                OrderState::Completed
            )
        );
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event_type, "OrderCancelled");
        assert!(pending[0].payload.contains("\"initiator\":\"orders\""));
    }
}
