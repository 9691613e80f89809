//! The I/O shell around [`crate::saga::react`]: every saga event is appended to its order's
//! history, then the rule runs; ProductChanged updates the catalog replica.
//!
//! It also times sagas (`mall_saga_duration_seconds`): when orders reads back its own
//! OrderCompleted or OrderCancelled, the time from the order's placement to that event is
//! observed. Reading it back rather than timing the transition where it is made means every
//! path is counted in one place — the rules here, a customer's cancel, the saga timeout — and
//! only a transition that committed (its event is published only after the commit), once: the
//! inbox drops redeliveries, and a retry of the same read after a rollback is not counted again.

use crate::saga;
use crate::store::{self, StoredOrder};
use events::{Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::metrics::prometheus::{HistogramOpts, HistogramVec};
use kafka::{ReactError, Reactor};
use std::sync::Mutex;

/// Buckets of `mall_saga_duration_seconds`: 10 ms to 2 min (a saga takes ~0.1 s on tansu; the
/// saga timeout, 30 s by default, ends the slow ones).
const SAGA_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Orders' reaction to everything on the topic that concerns an order or the catalog.
pub struct OrderReactor {
    /// `mall_saga_duration_seconds{outcome}`; the host's registry serves it once registered
    /// (see [`OrderReactor::saga_durations`]).
    saga_durations: HistogramVec,
    /// The event last timed: a read retried after a rollback is not timed twice.
    last_timed: Mutex<Option<String>>,
}

impl OrderReactor {
    /// A reactor whose saga durations are not yet registered anywhere.
    pub fn new() -> Self {
        let opts = HistogramOpts::new(
            "mall_saga_duration_seconds",
            "Time from an order's OrderPlaced to its first OrderCompleted or OrderCancelled \
             (a completed order cancelled later is not timed again), by outcome",
        )
        .buckets(SAGA_BUCKETS.to_vec());
        OrderReactor {
            saga_durations: HistogramVec::new(opts, &["outcome"])
                .expect("a fixed histogram definition is valid"),
            last_timed: Mutex::new(None),
        }
    }

    /// The saga-duration histogram, to register with the service's metrics:
    /// `host.metrics().register(reactor.saga_durations())`.
    pub fn saga_durations(&self) -> HistogramVec {
        self.saga_durations.clone()
    }

    /// Times the order's saga if `event` is orders' own OrderCompleted, or its OrderCancelled
    /// of an order that had not completed.
    fn time_saga(
        &self,
        conn: &mut DbConnection,
        stored: &StoredOrder,
        event: &Envelope,
    ) -> Result<(), ReactError> {
        if event.source != Service::Orders {
            return Ok(());
        }
        let outcome = match &event.event {
            Event::OrderCompleted(_) => "completed",
            Event::OrderCancelled(_) if !completed_before(conn, stored.order.id)? => "cancelled",
            _ => return Ok(()),
        };
        let Ok(placed) = chrono::DateTime::parse_from_rfc3339(&stored.created_at) else {
            log::warn!(
                "order {}: created_at {:?} is not RFC 3339; its saga is not timed",
                stored.order.id,
                stored.created_at
            );
            return Ok(());
        };
        let id = event.event_id.to_string();
        let mut last = self
            .last_timed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.as_deref() == Some(id.as_str()) {
            return Ok(());
        }
        *last = Some(id);
        let seconds = (event.timestamp - placed.to_utc())
            .to_std()
            .map_or(0.0, |d| d.as_secs_f64());
        self.saga_durations
            .with_label_values(&[outcome])
            .observe(seconds);
        Ok(())
    }
}

impl Default for OrderReactor {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether orders already read back its own OrderCompleted for the order (it precedes any
/// OrderCancelled on the order's partition).
fn completed_before(conn: &mut DbConnection, order_id: i64) -> Result<bool, ReactError> {
    Ok(store::history(conn, order_id)?
        .iter()
        .any(|h| h.event_type == "OrderCompleted" && h.source == Service::Orders.as_str()))
}

impl Reactor for OrderReactor {
    fn wants(&self, event: &Envelope) -> bool {
        event.event.order_id().is_some() || matches!(event.event, Event::ProductChanged(_))
    }

    fn react(
        &self,
        conn: &mut DbConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        if let Event::ProductChanged(p) = &event.event {
            store::upsert_product(conn, p)?;
            return Ok(Vec::new());
        }
        let Some(order_id) = event.event.order_id() else {
            return Ok(Vec::new());
        };
        store::record_history(conn, order_id, event)?;
        let Some(stored) = store::order(conn, order_id)? else {
            return Err(ReactError::Rejected(format!(
                "order {order_id} does not exist here"
            )));
        };
        self.time_saga(conn, &stored, event)?;
        let before = stored.order;
        let (after, caused) = saga::react(before.clone(), event);
        if after != before {
            store::save_order(conn, &after)?;
        }
        Ok(caused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::OrderState;
    use crate::store::NewOrder;
    use events::{CancelReason, OrderCancelled, OrderCompleted};
    use kafka::{Applied, Database, DbError, apply_once};
    use std::sync::Arc;

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;

    async fn place(db: &Database, seconds_ago: i64) -> i64 {
        let at = (chrono::Utc::now() - chrono::Duration::seconds(seconds_ago)).to_rfc3339();
        db.write(move |conn| {
            let new = NewOrder::fixture(OrderState::Placed.as_str(), at);
            Ok::<_, DbError>((store::insert_order(conn, &new)?.order.id, Vec::new()))
        })
        .await
        .unwrap()
    }

    fn completed(order_id: i64) -> Envelope {
        let event = OrderCompleted {
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
        };
        Envelope::new(Service::Orders, Event::OrderCompleted(event))
    }

    fn cancelled(order_id: i64) -> Envelope {
        let event = OrderCancelled {
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
            state_message: "cancelled by the customer".into(),
            reason: Some(CancelReason::Customer),
        };
        Envelope::new(Service::Orders, Event::OrderCancelled(event)).initiated_by(Service::Orders)
    }

    fn timed(reactor: &OrderReactor, outcome: &str) -> (u64, f64) {
        let h = reactor.saga_durations.with_label_values(&[outcome]);
        (h.get_sample_count(), h.get_sample_sum())
    }

    #[tokio::test]
    async fn a_saga_is_timed_once_when_orders_reads_back_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("o.db").to_str().unwrap(), MIGRATIONS).unwrap();
        let reactor = Arc::new(OrderReactor::new());
        let apply = |event: Envelope| apply_once(&db, reactor.clone(), event);

        // Completed 2 s after it was placed; a redelivery is not timed again.
        let first = place(&db, 2).await;
        let done = completed(first);
        assert_eq!(apply(done.clone()).await.unwrap(), Applied::Done(0));
        assert_eq!(apply(done).await.unwrap(), Applied::Duplicate);
        let (count, sum) = timed(&reactor, "completed");
        assert_eq!(count, 1);
        assert!((1.9..3.0).contains(&sum), "{sum}");

        // Cancelled later (delivery granted a customer's cancel): the saga had ended already.
        apply(cancelled(first)).await.unwrap();
        assert_eq!(timed(&reactor, "cancelled").0, 0);

        // A read that rolled back and is retried counts once.
        let second = place(&db, 0).await;
        let end = cancelled(second);
        let (r, e) = (reactor.clone(), end.clone());
        let rolled_back = db
            .write(move |conn| {
                r.react(conn, &e)?;
                Err::<((), Vec<Envelope>), _>(ReactError::Rejected("rolled back".into()))
            })
            .await;
        assert!(rolled_back.is_err());
        assert_eq!(apply(end).await.unwrap(), Applied::Done(0));
        assert_eq!(timed(&reactor, "cancelled").0, 1);

        // Events of other services, and forward events, time nothing.
        let third = place(&db, 0).await;
        let mut foreign = completed(third);
        foreign.source = Service::Products;
        apply(foreign).await.unwrap();
        assert_eq!(timed(&reactor, "completed").0, 1);
    }

    #[test]
    fn the_histogram_registers_with_the_service_metrics() {
        let metrics = kafka::Metrics::new();
        let reactor = OrderReactor::new();
        metrics.register(reactor.saga_durations()).unwrap();
        reactor
            .saga_durations
            .with_label_values(&["completed"])
            .observe(0.2);
        let text = metrics.render();
        assert!(
            text.contains("mall_saga_duration_seconds_count{outcome=\"completed\"} 1"),
            "{text}"
        );
        let again = metrics.register(reactor.saga_durations());
        assert!(again.is_err(), "registered once");
    }
}
