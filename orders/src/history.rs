//! Orders' own events enter their order's history in the transaction that writes them, and a
//! saga's end is timed once that transaction commits (`mall_saga_duration_seconds`), so orders
//! never reads its own events back from the topic (2 of the 5 events per saga it would apply).
//!
//! Every path that ends a saga — a rule reacting to products or delivery, a customer's cancel,
//! the saga timeout — writes through [`kafka::Database::write`], so it is timed in this one
//! place, and only if it committed, once: the sequel of a write runs after its commit only.

use crate::store;
use events::{Envelope, Event};
use kafka::db::{AfterCommit, DbConnection, WriteHook};
use kafka::metrics::prometheus::{HistogramOpts, HistogramVec};

/// Buckets of `mall_saga_duration_seconds`: 10 ms to 2 min (a saga takes ~0.1 s on tansu; the
/// saga timeout, 30 s by default, ends the slow ones).
const SAGA_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The [`WriteHook`] of orders' database: history and saga timing for the events it writes.
pub struct OrderHistory {
    /// `mall_saga_duration_seconds{outcome}`; the host's registry serves it once registered
    /// (see [`OrderHistory::saga_durations`]).
    saga_durations: HistogramVec,
}

impl OrderHistory {
    /// A hook whose saga durations are not yet registered anywhere.
    pub fn new() -> Self {
        let opts = HistogramOpts::new(
            "mall_saga_duration_seconds",
            "Time from an order's OrderPlaced to its first OrderCompleted or OrderCancelled \
             (a completed order cancelled later is not timed again), by outcome",
        )
        .buckets(SAGA_BUCKETS.to_vec());
        OrderHistory {
            saga_durations: HistogramVec::new(opts, &["outcome"])
                .expect("a fixed histogram definition is valid"),
        }
    }

    /// The saga-duration histogram, to register with the service's metrics:
    /// `host.metrics().register(history.saga_durations())`.
    pub fn saga_durations(&self) -> HistogramVec {
        self.saga_durations.clone()
    }
}

impl Default for OrderHistory {
    fn default() -> Self {
        Self::new()
    }
}

impl WriteHook for OrderHistory {
    fn writing(
        &self,
        conn: &mut DbConnection,
        events: &[Envelope],
    ) -> diesel::QueryResult<Option<AfterCommit>> {
        // Which events end a saga, decided as if they were recorded one by one: a cancel of
        // an order completed before (in the database, or earlier in this write) is no end.
        let mut completed_here = std::collections::HashSet::new();
        let mut ends = Vec::new();
        let mut rows = Vec::with_capacity(events.len());
        for event in events {
            let Some(order_id) = event.event.order_id() else {
                continue;
            };
            let outcome = match &event.event {
                Event::OrderCompleted(_) => {
                    completed_here.insert(order_id);
                    Some("completed")
                }
                Event::OrderCancelled(_)
                    if !completed_here.contains(&order_id)
                        && !store::was_completed(conn, order_id)? =>
                {
                    Some("cancelled")
                }
                _ => None,
            };
            rows.push((order_id, event));
            if let Some(outcome) = outcome {
                ends.push((outcome, order_id, event));
            }
        }
        // One statement each for the whole write (a consumer's batch completes many orders):
        // on PostgreSQL every statement is a round trip.
        store::record_histories(conn, &rows)?;
        let placed = if ends.is_empty() {
            Default::default()
        } else {
            let ids: Vec<i64> = ends.iter().map(|(_, id, _)| *id).collect();
            store::placed_at_each(conn, &ids)?
        };
        let ended: Vec<(&str, f64)> = ends
            .into_iter()
            .filter_map(|(outcome, order_id, end)| {
                Some((
                    outcome,
                    saga_seconds(order_id, placed.get(&order_id)?, end)?,
                ))
            })
            .collect();
        if ended.is_empty() {
            return Ok(None);
        }
        let durations = self.saga_durations.clone();
        Ok(Some(Box::new(move || {
            for (outcome, seconds) in ended {
                durations.with_label_values(&[outcome]).observe(seconds);
            }
        })))
    }
}

/// Seconds from the order's placement (`created_at`) to `end`; None (logged) if `created_at`
/// is unusable.
fn saga_seconds(order_id: i64, created_at: &str, end: &Envelope) -> Option<f64> {
    let Ok(placed) = chrono::DateTime::parse_from_rfc3339(created_at) else {
        log::warn!("order {order_id}: created_at {created_at:?} is not RFC 3339; not timed");
        return None;
    };
    Some(
        (end.timestamp - placed.to_utc())
            .to_std()
            .map_or(0.0, |d| d.as_secs_f64()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::OrderReactor;
    use crate::saga::{self, OrderState};
    use crate::store::NewOrder;
    use events::{DeliveryStarted, DeliveryState, Service, StockMoved};
    use kafka::{Applied, Database, DbError, ReactError, apply_once};
    use std::sync::Arc;

    struct Mall {
        _dir: tempfile::TempDir,
        db: Database,
        history: Arc<OrderHistory>,
    }

    fn open() -> Mall {
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(OrderHistory::new());
        let path = dir.path().join("o.db");
        let db = Database::open(path.to_str().unwrap(), crate::startup::MIGRATIONS)
            .unwrap()
            .with_write_hook(history.clone());
        Mall {
            _dir: dir,
            db,
            history,
        }
    }

    impl Mall {
        /// Places an order as `POST /orders` does, `seconds_ago`.
        async fn place(&self, seconds_ago: i64) -> i64 {
            let at = (chrono::Utc::now() - chrono::Duration::seconds(seconds_ago)).to_rfc3339();
            self.db
                .write(move |conn| {
                    let new = NewOrder::fixture(OrderState::Placed.as_str(), at);
                    let order = store::insert_order(conn, &new)?.order;
                    Ok::<_, DbError>((order.id, vec![saga::placed(&order)]))
                })
                .await
                .unwrap()
        }

        /// Runs the customer's cancel as `PATCH /orders/{id}` does; `fail` rolls it back.
        async fn cancel(&self, order_id: i64, fail: bool) -> Result<(), DbError> {
            self.db
                .write(move |conn| {
                    let order = store::order(conn, order_id)?.unwrap().order;
                    let (order, event) = match saga::cancel_by_customer(order).unwrap() {
                        saga::CustomerCancel::Cancelled(o, e)
                        | saga::CustomerCancel::Requested(o, e) => (o, e),
                    };
                    store::save_order(conn, &order)?;
                    if fail {
                        return Err(DbError::Task("rolled back".into()));
                    }
                    Ok(((), vec![event]))
                })
                .await
        }

        async fn apply(&self, event: Envelope) -> Result<Applied, ReactError> {
            apply_once(&self.db, Arc::new(OrderReactor), event).await
        }

        /// The order's history: (event type, source).
        async fn history(&self, order_id: i64) -> Vec<(String, String)> {
            self.db
                .read(move |conn| store::history(conn, order_id).map_err(DbError::from))
                .await
                .unwrap()
                .into_iter()
                .map(|h| (h.event_type, h.source))
                .collect()
        }

        fn timed(&self, outcome: &str) -> (u64, f64) {
            let h = self.history.saga_durations.with_label_values(&[outcome]);
            (h.get_sample_count(), h.get_sample_sum())
        }
    }

    fn stock_decreased(order_id: i64) -> Envelope {
        let moved = StockMoved {
            order_id,
            product_id: 1,
            quantity: 1,
            product_stock: 9,
        };
        Envelope::new(Service::Products, Event::StockDecreased(moved))
    }

    fn delivery_started(order_id: i64) -> Envelope {
        let started = DeliveryStarted {
            delivery_id: 7,
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
            customer_name: None,
            delivery_address: None,
            delivery_state: DeliveryState::Started,
        };
        Envelope::new(Service::Delivery, Event::DeliveryStarted(started))
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(t, s)| (t.to_string(), s.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn own_events_enter_the_history_as_written_and_the_end_is_timed_once() {
        let mall = open();
        // Completed by the rule 2 s after it was placed; a redelivery times nothing more.
        let first = mall.place(2).await;
        assert_eq!(
            mall.apply(stock_decreased(first)).await.unwrap(),
            Applied::Done(0)
        );
        let started = delivery_started(first);
        assert_eq!(mall.apply(started.clone()).await.unwrap(), Applied::Done(1));
        assert_eq!(mall.apply(started).await.unwrap(), Applied::Duplicate);
        assert_eq!(
            mall.history(first).await,
            pairs(&[
                ("OrderPlaced", "orders"),
                ("StockDecreased", "products"),
                ("DeliveryStarted", "delivery"),
                ("OrderCompleted", "orders"),
            ])
        );
        let (count, sum) = mall.timed("completed");
        assert_eq!(count, 1);
        assert!((1.9..3.0).contains(&sum), "{sum}");

        // The customer's cancel of a completed order is only a request; its end is not a
        // saga's end either way.
        mall.cancel(first, false).await.unwrap();
        assert_eq!(mall.timed("cancelled").0, 0);
        assert_eq!(
            mall.history(first).await.last().unwrap(),
            &("OrderCancelRequested".to_string(), "orders".to_string())
        );

        // A cancel that rolled back records and times nothing; the one that commits, once.
        let second = mall.place(0).await;
        assert!(mall.cancel(second, true).await.is_err());
        assert_eq!(mall.timed("cancelled").0, 0);
        assert_eq!(mall.history(second).await.len(), 1);
        mall.cancel(second, false).await.unwrap();
        assert_eq!(mall.timed("cancelled").0, 1);
        assert_eq!(
            mall.history(second).await,
            pairs(&[("OrderPlaced", "orders"), ("OrderCancelled", "orders")])
        );
        assert_eq!(mall.timed("completed").0, 1);
    }

    #[tokio::test]
    async fn a_completed_order_cancelled_later_is_not_timed_again() {
        let mall = open();
        let order = mall.place(0).await;
        mall.apply(stock_decreased(order)).await.unwrap();
        mall.apply(delivery_started(order)).await.unwrap();
        mall.cancel(order, false).await.unwrap(); // requested
        // Delivery grants it: the rule cancels the order, initiated by orders.
        let granted = events::DeliveryCancelled {
            delivery_id: 7,
            order_id: order,
            product_id: 1,
            quantity: 1,
            delivery_state: DeliveryState::Cancelled,
            state_message: "cancelled".into(),
        };
        let granted = Envelope::new(Service::Delivery, Event::DeliveryCancelled(granted))
            .initiated_by(Service::Orders);
        assert_eq!(mall.apply(granted).await.unwrap(), Applied::Done(1));
        assert_eq!(
            mall.history(order).await.last().unwrap(),
            &("OrderCancelled".to_string(), "orders".to_string())
        );
        assert_eq!(
            (mall.timed("completed").0, mall.timed("cancelled").0),
            (1, 0)
        );
    }

    /// A write that completes several orders (a consumer's batch) records their history and
    /// reads their placement times with one statement each, not one per order: each is a
    /// round trip on PostgreSQL. Every order is still recorded and timed.
    #[tokio::test]
    async fn a_batch_of_ends_is_recorded_and_timed_with_one_statement_each() {
        use diesel::Connection;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mall = open();
        let mut orders = Vec::new();
        for _ in 0..5 {
            orders.push(mall.place(1).await);
        }
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let counted = counts.clone();
        let completions: Vec<Envelope> = orders
            .iter()
            .map(|id| {
                let completed = events::OrderCompleted {
                    order_id: *id,
                    product_id: 1,
                    quantity: 1,
                    customer_id: "c".into(),
                };
                Envelope::new(Service::Orders, Event::OrderCompleted(completed))
            })
            .collect();
        mall.db
            .write(move |conn| {
                conn.set_instrumentation(move |e: diesel::connection::InstrumentationEvent<'_>| {
                    if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = e {
                        let sql = query.to_string();
                        if sql.starts_with("INSERT INTO `order_events`") {
                            counted[0].fetch_add(1, Ordering::SeqCst);
                        } else if sql.starts_with("SELECT") && sql.contains("created_at") {
                            counted[1].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                Ok::<_, DbError>(((), completions))
            })
            .await
            .unwrap();
        let statements = [0, 1].map(|i| counts[i].load(Ordering::SeqCst));
        assert_eq!(statements, [1, 1], "history inserts, placement reads");
        for id in orders {
            assert_eq!(
                mall.history(id).await,
                pairs(&[("OrderPlaced", "orders"), ("OrderCompleted", "orders")])
            );
        }
        let (count, sum) = mall.timed("completed");
        assert_eq!(count, 5);
        assert!((4.5..10.0).contains(&sum), "{sum}");
    }

    #[test]
    fn the_histogram_registers_with_the_service_metrics() {
        let metrics = kafka::Metrics::new();
        let history = OrderHistory::new();
        metrics.register(history.saga_durations()).unwrap();
        history
            .saga_durations
            .with_label_values(&["completed"])
            .observe(0.2);
        let text = metrics.render();
        assert!(
            text.contains("mall_saga_duration_seconds_count{outcome=\"completed\"} 1"),
            "{text}"
        );
        let again = metrics.register(history.saga_durations());
        assert!(again.is_err(), "registered once");
    }
}
