//! The saga timeout's I/O shell: every second, orders still pending after `SAGA_TIMEOUT_S` are
//! cancelled by [`crate::saga::time_out`], each in its own transaction with its OrderCancelled,
//! and cancel requests delivery has not answered within it (delivery down, or the request
//! parked) are closed by [`crate::saga::expire_cancel_request`], saying so.
//!
//! The clock alone is not the judge: an answer that reached the topic before an order's
//! deadline must win over the timer, even when orders reads it late (it was down, or behind).
//! So an order times out only once orders has read the topic past its deadline: its deadline
//! must lie before both now and the moment through which every partition has been read
//! ([`kafka::consumer::ConsumerStatus::read_through`], from the positions stored with the
//! effects).

use crate::{saga, store};
use chrono::{DateTime, Utc};
use kafka::consumer::ConsumerStatus;
use kafka::{Database, DbError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Orders cancelled per pass at most; the next pass takes the rest.
const BATCH: i64 = 200;

/// What has been read of the topic: the moment through which every partition was read.
pub trait ReadThrough: Send + Sync {
    /// `None` while nothing is known to have been read through.
    fn read_through(&self, positions: &BTreeMap<i32, i64>) -> Option<DateTime<Utc>>;
}

impl ReadThrough for ConsumerStatus {
    fn read_through(&self, positions: &BTreeMap<i32, i64>) -> Option<DateTime<Utc>> {
        ConsumerStatus::read_through(self, positions)
    }
}

/// Cancels pending orders older than `timeout` until `stop`, once `consumer` has read `topic`
/// past their deadline.
pub async fn run(
    db: Database,
    timeout: Duration,
    consumer: Arc<dyn ReadThrough>,
    topic: String,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = pass(&db, timeout, consumer.as_ref(), &topic).await {
            log::warn!("saga timeout: {e}; trying again in a second");
        }
    }
}

/// One pass; returns how many orders it cancelled plus how many cancel requests it closed.
pub async fn pass(
    db: &Database,
    timeout: Duration,
    consumer: &dyn ReadThrough,
    topic: &str,
) -> Result<usize, DbError> {
    let positions = {
        let topic = topic.to_owned();
        db.read(move |conn| kafka::offsets::load(conn, &topic).map_err(DbError::from))
            .await?
    };
    let Some(read_through) = consumer.read_through(&positions) else {
        return Ok(0); // nothing known read yet: no answer may be missed
    };
    let cutoff = cutoff(timeout, read_through.min(Utc::now()));
    let due = {
        let cutoff = cutoff.clone();
        db.read(move |conn| store::pending_before(conn, &cutoff, BATCH).map_err(DbError::from))
            .await?
    };
    let mut cancelled = expire_requests(db, timeout, &cutoff).await?;
    for id in due {
        let cutoff = cutoff.clone();
        let secs = timeout.as_secs();
        let done = db
            .write(move |conn| {
                // Re-read under the order's lock: a confirmation may have just completed it.
                let Some(mut stored) = store::order_to_change(conn, id)? else {
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

/// Closes the cancel requests last touched before `cutoff` (so unanswered for the timeout,
/// as far as orders has read the topic); returns how many.
async fn expire_requests(db: &Database, timeout: Duration, cutoff: &str) -> Result<usize, DbError> {
    let due = {
        let cutoff = cutoff.to_owned();
        db.read(move |conn| {
            store::cancel_requests_before(conn, &cutoff, BATCH).map_err(DbError::from)
        })
        .await?
    };
    let mut expired = 0;
    for id in due {
        let (cutoff, secs) = (cutoff.to_owned(), timeout.as_secs());
        let done = db
            .write(move |conn| {
                // Re-read under the order's lock: delivery's answer may have just arrived.
                let Some(stored) = store::order_to_change(conn, id)? else {
                    return Ok((false, Vec::new()));
                };
                if stored.updated_at >= cutoff {
                    return Ok((false, Vec::new()));
                }
                let Some((order, event)) = saga::expire_cancel_request(stored.order, secs) else {
                    return Ok((false, Vec::new()));
                };
                store::save_order(conn, &order)?;
                Ok::<_, DbError>((true, vec![event]))
            })
            .await?;
        if done {
            log::warn!(
                "order {id}: delivery did not answer its cancel request within {secs} s; request closed",
                secs = timeout.as_secs()
            );
            expired += 1;
        }
    }
    Ok(expired)
}

/// Orders created before this are past their deadline as of `read_through`.
fn cutoff(timeout: Duration, read_through: DateTime<Utc>) -> String {
    let age = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    (read_through - age).to_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::OrderState;
    use crate::store::NewOrder;
    use diesel::RunQueryDsl;

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;

    fn new_order(created_at: String) -> NewOrder {
        NewOrder::fixture(OrderState::Placed.as_str(), created_at)
    }

    /// A consumer that has read the topic through a fixed moment (or nothing).
    struct ReadUntil(Option<DateTime<Utc>>);

    impl ReadThrough for ReadUntil {
        fn read_through(&self, _: &BTreeMap<i32, i64>) -> Option<DateTime<Utc>> {
            self.0
        }
    }

    const TOPIC: &str = "eventTopic";

    #[tokio::test]
    async fn an_order_times_out_only_once_the_topic_is_read_past_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let created = Utc::now() - chrono::Duration::seconds(60);
        let at = created.to_rfc3339();
        db.write(move |conn| {
            store::insert_order(conn, &new_order(at))?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let timeout = Duration::from_secs(30);
        // 60 s old by the clock, but orders has read nothing, or only up to 29 s after the
        // order was placed: an answer may be waiting on the topic.
        assert_eq!(
            pass(&db, timeout, &ReadUntil(None), TOPIC).await.unwrap(),
            0
        );
        let before_deadline = ReadUntil(Some(created + chrono::Duration::seconds(29)));
        assert_eq!(
            pass(&db, timeout, &before_deadline, TOPIC).await.unwrap(),
            0
        );
        let past_deadline = ReadUntil(Some(created + chrono::Duration::seconds(31)));
        assert_eq!(pass(&db, timeout, &past_deadline, TOPIC).await.unwrap(), 1);
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
        let read_now = ReadUntil(Some(Utc::now()));
        let timeout = Duration::from_secs(30);
        assert_eq!(pass(&db, timeout, &read_now, TOPIC).await.unwrap(), 1);
        assert_eq!(
            pass(&db, timeout, &read_now, TOPIC).await.unwrap(),
            0,
            "once"
        );
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

    /// Delivery parked the customer's OrderCancelRequested (or never read it): once orders
    /// has read the topic past the request's deadline, the request closes with a stated
    /// reason, once; a request answered in time, or younger, stays as it is.
    #[tokio::test]
    async fn an_unanswered_cancel_request_is_closed_once_the_topic_is_read_past_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let asked = Utc::now() - chrono::Duration::seconds(60);
        let (at, then) = (asked.to_rfc3339(), asked.to_rfc3339());
        let (old, young) = db
            .write(move |conn| {
                let mut ids = Vec::new();
                for _ in 0..2 {
                    let mut order = store::insert_order(conn, &new_order(at.clone()))?.order;
                    order.state = OrderState::Completed;
                    order.delivery_state = Some(events::DeliveryState::Started);
                    let Ok(saga::CustomerCancel::Requested(order, _)) =
                        saga::cancel_by_customer(order)
                    else {
                        panic!("a confirmed order is requested to cancel")
                    };
                    store::save_order(conn, &order)?;
                    ids.push(order.id);
                }
                // the first request was made a minute ago, the second just now
                diesel::sql_query(format!(
                    "UPDATE orders SET updated_at = '{then}' WHERE id = {}",
                    ids[0]
                ))
                .execute(conn)?;
                Ok::<_, DbError>(((ids[0], ids[1]), Vec::new()))
            })
            .await
            .unwrap();
        let timeout = Duration::from_secs(30);
        let before_deadline = ReadUntil(Some(asked + chrono::Duration::seconds(29)));
        assert_eq!(
            pass(&db, timeout, &before_deadline, TOPIC).await.unwrap(),
            0
        );
        let read_now = ReadUntil(Some(Utc::now()));
        assert_eq!(pass(&db, timeout, &read_now, TOPIC).await.unwrap(), 1);
        assert_eq!(
            pass(&db, timeout, &read_now, TOPIC).await.unwrap(),
            0,
            "once"
        );
        let (old, young, pending) = db
            .read(move |conn| {
                let old = store::order(conn, old)?.unwrap().order;
                let young = store::order(conn, young)?.unwrap().order;
                Ok::<_, DbError>((old, young, kafka::outbox::pending(conn, 10)?))
            })
            .await
            .unwrap();
        assert!(!old.cancel_requested);
        assert_eq!(old.state, OrderState::Completed);
        assert!(old.state_message.unwrap().contains("unanswered"));
        assert!(young.cancel_requested, "not yet due");
        assert_eq!(
            pending.len(),
            1,
            "one CancelRequestExpired, with the change"
        );
        assert_eq!(pending[0].event_type, "CancelRequestExpired");
    }

    #[derive(diesel::QueryableByName)]
    struct Named {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }

    /// The sweep's index exists: its migration's version differs from the plumbing's (diesel
    /// keys applied migrations by version alone, in one table for both sets, so a shared
    /// version would skip it silently).
    #[tokio::test]
    async fn the_open_cancel_requests_index_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let indexes = db
            .read(|conn| {
                diesel::sql_query("SELECT name FROM sqlite_master WHERE type = 'index'")
                    .load::<Named>(conn)
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        let names: Vec<String> = indexes.into_iter().map(|n| n.name).collect();
        assert!(
            names.contains(&"orders_cancel_requested".to_owned()),
            "{names:?}"
        );
        assert!(
            names.contains(&"dead_letters_by_status".to_owned()),
            "{names:?}"
        );
    }
}
