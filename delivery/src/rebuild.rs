//! Delivery's part of rebuilding its database from the topic ([`kafka::rebuild`] reads the
//! topic into an empty database, records the consumed ids and stores the positions at the
//! ends): how each event read back changes the deliveries. Nothing is re-decided and nothing
//! is published. Per event type ([`saga::replay`]):
//!
//! - DeliveryStarted (delivery's): the order's delivery, Started, with the id, product,
//!   quantity and customer it was started with.
//! - DeliveryCompleted (delivery's, a courier's PATCH): Completed.
//! - DeliveryCancelled (delivery's: a courier's PATCH, an OrderCancelled, a granted
//!   OrderCancelRequested): Cancelled, with its reason.
//! - CancelRefused (delivery's): nothing (the delivery did not change).
//! - OrderPlaced, OrderCancelRequested: nothing; what delivery decided is on the topic above.
//! - OrderCompleted: through [`saga::react`]: the order is confirmed, so the courier may
//!   complete it (delivery publishes nothing for it).
//! - OrderCancelled: through [`saga::react`] only where it publishes nothing — before any
//!   delivery the order is voided (a late OrderPlaced starts nothing); a cancel of a started
//!   delivery published DeliveryCancelled, applied as such.
//! - Anything else: nothing.
//!
//! Delivery ids: every DeliveryStarted on the topic is rebuilt with its id, and the table's
//! sequence is moved past the highest ([`store::next_id`] draws from it), so no id on the
//! topic is issued again.

use crate::reactor::DeliveryReactor;
use crate::saga::{self, OrderDelivery};
use crate::store;
use diesel::QueryResult;
use events::{Envelope, Service};
use kafka::db::DbConnection;
use kafka::rebuild::Rebuild;

impl Rebuild for DeliveryReactor {
    fn service(&self) -> Service {
        Service::Delivery
    }

    /// No delivery and no voided order.
    fn is_empty(&self, conn: &mut DbConnection) -> QueryResult<bool> {
        store::is_empty(conn)
    }

    fn apply_read_back(&self, conn: &mut DbConnection, event: &Envelope) -> QueryResult<()> {
        let Some(order_id) = event.event.order_id() else {
            return Ok(());
        };
        let before = store::by_order(conn, order_id)?;
        let after = saga::replay(before.clone(), event);
        if after == before {
            return Ok(());
        }
        match &after {
            OrderDelivery::Known(delivery) => store::save(conn, delivery),
            OrderDelivery::Voided => store::void(conn, order_id),
            OrderDelivery::Unknown => Ok(()),
        }
    }

    /// The sequence goes past the ids the topic's deliveries were rebuilt with (PostgreSQL's
    /// does not follow explicit ids; SQLite's high-water mark does, and is moved all the same).
    fn finish(&self, conn: &mut DbConnection) -> QueryResult<()> {
        match store::highest_id(conn)? {
            Some(highest) => store::issue_after(conn, highest),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::{Delivery, DeliveryState};
    use events::{
        CancelReason, Event, OrderCancelRequested, OrderCancelled, OrderCompleted, OrderPlaced,
    };
    use kafka::db::DbError;
    use kafka::{Database, ReactError, Reactor};

    fn open(dir: &tempfile::TempDir, name: &str) -> Database {
        let url = dir.path().join(name);
        Database::open(
            url.to_str().expect("utf-8 path"),
            crate::startup::MIGRATIONS,
        )
        .expect("database")
    }

    fn placed(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id,
                product_id: 1,
                product_name: None,
                quantity: 2,
                price: None,
                customer_id: "c".into(),
                customer_name: Some("Kim".into()),
                customer_addr: Some("Seoul".into()),
            }),
        )
    }

    fn completed(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
            }),
        )
    }

    fn cancelled(order_id: i64, by: Service) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelled(OrderCancelled {
                order_id,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
                state_message: "customer".into(),
                reason: Some(CancelReason::Customer),
            }),
        )
        .initiated_by(by)
    }

    fn cancel_requested(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelRequested(OrderCancelRequested {
                order_id,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
                state_message: "changed my mind".into(),
            }),
        )
    }

    /// The live delivery: its consumer, its courier, and the topic they make.
    struct Live {
        db: Database,
        topic: Vec<Envelope>,
    }

    impl Live {
        async fn consume(&mut self, incoming: Envelope) -> Vec<Envelope> {
            self.topic.push(incoming.clone());
            self.db
                .write(move |conn| {
                    let caused = DeliveryReactor.react(conn, &incoming)?;
                    Ok::<_, ReactError>((caused, Vec::new()))
                })
                .await
                .expect("applied")
        }

        async fn consume_and_publish(&mut self, incoming: Envelope) {
            let caused = self.consume(incoming).await;
            self.topic.extend(caused);
        }

        /// `PATCH /deliveries/{id}` of the order's delivery.
        async fn courier(&mut self, order_id: i64, target: DeliveryState) {
            let event = self
                .db
                .write(move |conn| {
                    let OrderDelivery::Known(current) = store::by_order(conn, order_id)? else {
                        panic!("no delivery for order {order_id}")
                    };
                    let (delivery, event) = saga::courier_update(current, target).expect("allowed");
                    store::save(conn, &delivery)?;
                    Ok::<_, DbError>((event, Vec::new()))
                })
                .await
                .expect("updated");
            self.topic.push(event);
        }
    }

    async fn state(db: &Database) -> (Vec<Delivery>, Vec<OrderDelivery>) {
        db.read(|conn| {
            let page = kafka::http::Page {
                after: 0,
                limit: 1000,
            };
            let orders = (1..=8)
                .map(|id| store::by_order(conn, id))
                .collect::<QueryResult<Vec<_>>>()?;
            Ok::<_, DbError>((store::list(conn, None, page)?, orders))
        })
        .await
        .expect("read")
    }

    /// Delivery rebuilt from the topic the live delivery made holds exactly its deliveries:
    /// completed by the courier, cancelled by an OrderCancelled, cancelled by the courier,
    /// cancelled on the customer's request, a refused request, one started but not completed
    /// (confirmed), one not confirmed, an order voided by an early cancel, and a cancel that
    /// reached the topic before delivery's own DeliveryStarted. A new delivery after it takes
    /// an id the topic does not hold.
    #[tokio::test]
    async fn a_rebuilt_delivery_holds_what_the_live_one_holds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut live = Live {
            db: open(&dir, "live.db"),
            topic: Vec::new(),
        };
        // 1: completed by the courier
        live.consume_and_publish(placed(1)).await;
        live.consume_and_publish(completed(1)).await;
        live.courier(1, DeliveryState::Completed).await;
        // 2: cancelled by the order's cancel
        live.consume_and_publish(placed(2)).await;
        live.consume_and_publish(cancelled(2, Service::Orders))
            .await;
        // 3: cancelled by the courier (and the chain's OrderCancelled, initiated by delivery)
        live.consume_and_publish(placed(3)).await;
        live.courier(3, DeliveryState::Cancelled).await;
        live.consume_and_publish(cancelled(3, Service::Delivery))
            .await;
        // 4: confirmed, then called off on the customer's request
        live.consume_and_publish(placed(4)).await;
        live.consume_and_publish(completed(4)).await;
        live.consume_and_publish(cancel_requested(4)).await;
        // 5: completed, then a request refused
        live.consume_and_publish(placed(5)).await;
        live.consume_and_publish(completed(5)).await;
        live.courier(5, DeliveryState::Completed).await;
        live.consume_and_publish(cancel_requested(5)).await;
        // 6: started and confirmed, not delivered yet; 7: started, not confirmed
        live.consume_and_publish(placed(6)).await;
        live.consume_and_publish(completed(6)).await;
        live.consume_and_publish(placed(7)).await;
        // 8: the cancel reaches the topic before delivery's DeliveryStarted for the order
        let started = live.consume(placed(8)).await;
        let cancelled_8 = live.consume(cancelled(8, Service::Orders)).await;
        live.topic.extend(started);
        live.topic.extend(cancelled_8);
        // 9: voided by an early cancel; the late OrderPlaced starts nothing
        live.consume_and_publish(cancelled(9, Service::Orders))
            .await;
        live.consume_and_publish(placed(9)).await;

        let expected = state(&live.db).await;
        let rebuilt = open(&dir, "rebuilt.db");
        let topic = live.topic.clone();
        rebuilt
            .write(move |conn| {
                assert!(DeliveryReactor.is_empty(conn)?);
                for event in &topic {
                    DeliveryReactor.apply_read_back(conn, event)?;
                }
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await
            .expect("rebuilt");
        assert_eq!(state(&rebuilt).await, expected);
        for db in [&live.db, &rebuilt] {
            let order_9 = db
                .read(|conn| store::by_order(conn, 9).map_err(DbError::from))
                .await
                .expect("read");
            assert_eq!(order_9, OrderDelivery::Voided);
        }
        // the live states the comparison stands on
        let states: Vec<(DeliveryState, bool)> = expected
            .0
            .iter()
            .map(|d| (d.state, d.order_confirmed))
            .collect();
        use DeliveryState::{Cancelled, Completed, Started};
        assert_eq!(
            states,
            [
                (Completed, true),
                (Cancelled, false),
                (Cancelled, false),
                (Cancelled, true),
                (Completed, true),
                (Started, true),
                (Started, false),
                (Cancelled, false)
            ]
        );
        let next = rebuilt
            .write(|conn| Ok::<_, DbError>((store::next_id(conn)?, Vec::new())))
            .await
            .expect("read");
        assert_eq!(next, 9, "after the ids on the topic");
    }
}
