//! The I/O shell around [`crate::saga::react`].

use crate::saga::OrderDelivery;
use crate::{saga, store};
use events::{Envelope, Event};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};
use std::collections::{BTreeSet, HashMap};

/// Delivery's reaction to OrderPlaced, OrderCompleted, OrderCancelled and
/// OrderCancelRequested.
pub struct DeliveryReactor;

impl Reactor for DeliveryReactor {
    fn wants(&self, event: &Envelope) -> bool {
        matches!(
            event.event,
            Event::OrderPlaced(_)
                | Event::OrderCompleted(_)
                | Event::OrderCancelled(_)
                | Event::OrderCancelRequested(_)
        )
    }

    fn react(
        &self,
        conn: &mut DbConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        let Some(order_id) = event.event.order_id() else {
            return Ok(Vec::new());
        };
        // One statement: the order's delivery, and the next id exactly when the rule starts
        // a delivery (an OrderPlaced for an order with no delivery, not voided:
        // `saga::starts_a_delivery`); no other rule reads it.
        let placing = matches!(event.event, Event::OrderPlaced(_));
        let (before, next_id) = store::by_order_with_next_id(conn, order_id, placing)?;
        let next_id = next_id.unwrap_or_default();
        let (after, caused) = saga::react(before.clone(), event, next_id);
        if after != before {
            match &after {
                OrderDelivery::Known(delivery) => store::save(conn, delivery)?,
                OrderDelivery::Voided => store::void(conn, order_id)?,
                OrderDelivery::Unknown => {}
            }
        }
        Ok(caused)
    }

    /// The batch's deliveries (and voided marks) read in one statement, the ids of the
    /// deliveries it starts drawn in one, the rule run on each event in memory, and each
    /// changed delivery stored once.
    fn react_all(
        &self,
        conn: &mut DbConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Vec<Envelope>>, ReactError> {
        let ids: Vec<i64> = events
            .iter()
            .filter_map(|e| e.event.order_id())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let stored = store::by_orders(conn, &ids)?;
        // The rule is pure: a dry run says how many deliveries the batch starts.
        let starts = run(stored.clone(), events, &mut std::iter::repeat(0)).1;
        let mut new_ids = store::next_ids(conn, starts)?.into_iter();
        let (now, drawn, caused) = run(stored.clone(), events, &mut new_ids);
        debug_assert_eq!(drawn, starts);
        for (order_id, delivery) in &now {
            if stored.get(order_id) == Some(delivery) {
                continue;
            }
            match delivery {
                OrderDelivery::Known(delivery) => store::save(conn, delivery)?,
                OrderDelivery::Voided => store::void(conn, *order_id)?,
                OrderDelivery::Unknown => {}
            }
        }
        Ok(caused)
    }
}

/// [`saga::react`] on each of `events` in turn, from `deliveries` (by order); a delivery that
/// starts takes the next of `ids`. The deliveries after, how many started, and what each
/// event caused.
fn run(
    mut deliveries: HashMap<i64, OrderDelivery>,
    events: &[&Envelope],
    ids: &mut dyn Iterator<Item = i64>,
) -> (HashMap<i64, OrderDelivery>, usize, Vec<Vec<Envelope>>) {
    let mut started = 0;
    let caused = events
        .iter()
        .map(|event| {
            let Some(order_id) = event.event.order_id() else {
                return Vec::new();
            };
            let current = deliveries
                .remove(&order_id)
                .unwrap_or(OrderDelivery::Unknown);
            let next_id = if saga::starts_a_delivery(&current, event) {
                started += 1;
                ids.next().unwrap_or_default()
            } else {
                0
            };
            let (after, caused) = saga::react(current, event, next_id);
            deliveries.insert(order_id, after);
            caused
        })
        .collect();
    (deliveries, started, caused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{
        CancelReason, OrderCancelRequested, OrderCancelled, OrderCompleted, OrderPlaced, Service,
    };

    fn placed(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id,
                product_id: 1,
                product_name: None,
                quantity: 1,
                price: None,
                customer_id: "c".into(),
                customer_name: None,
                customer_addr: None,
            }),
        )
    }

    fn completed(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    }

    fn cancelled(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelled(OrderCancelled {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                state_message: "x".into(),
                reason: Some(CancelReason::Customer),
            }),
        )
    }

    fn cancel_requested(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelRequested(OrderCancelRequested {
                order_id,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                state_message: "x".into(),
            }),
        )
        .initiated_by(Service::Orders)
    }

    /// One way to apply a batch: event by event, or at once.
    type Apply = fn(&mut DbConnection, &[Envelope]) -> Result<Vec<Vec<Envelope>>, ReactError>;

    /// What a run left: each event's caused events (ids and times aside) and each order's
    /// delivery.
    type Outcome = (
        Vec<Vec<(Event, Option<String>, Option<Service>)>>,
        Vec<OrderDelivery>,
    );

    async fn run_on_new_database(events: Vec<Envelope>, apply: Apply) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("d.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        db.write(move |conn| {
            let caused = apply(conn, &events)?
                .into_iter()
                .map(|caused| {
                    caused
                        .into_iter()
                        .map(|e| {
                            (
                                e.event,
                                e.causation_id.map(|id| id.to_string()),
                                e.initiator,
                            )
                        })
                        .collect()
                })
                .collect();
            let deliveries = (1..=5)
                .map(|id| store::by_order(conn, id))
                .collect::<Result<_, _>>()?;
            Ok::<_, ReactError>(((caused, deliveries), Vec::new()))
        })
        .await
        .unwrap()
    }

    /// A batch decided at once leaves the deliveries (and their ids) its events leave one by
    /// one, and causes the same events: starts, a confirmation, a cancel before its
    /// OrderPlaced, a requested cancel, a repeated OrderPlaced.
    #[tokio::test]
    async fn a_batch_at_once_does_what_its_events_do_one_by_one() {
        let events = vec![
            placed(1),
            cancelled(2),
            placed(3),
            completed(1),
            placed(2),
            cancel_requested(3),
            placed(1),
            placed(4),
            completed(5),
        ];
        let one_by_one = run_on_new_database(events.clone(), |conn, events| {
            events
                .iter()
                .map(|e| DeliveryReactor.react(conn, e))
                .collect()
        })
        .await;
        let at_once = run_on_new_database(events, |conn, events| {
            DeliveryReactor.react_all(conn, &events.iter().collect::<Vec<_>>())
        })
        .await;
        assert_eq!(at_once, one_by_one);
        let ids: Vec<Option<i64>> = at_once
            .1
            .iter()
            .map(|d| match d {
                OrderDelivery::Known(d) => Some(d.id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [Some(1), None, Some(2), Some(3), None]);
        assert_eq!(at_once.1[1], OrderDelivery::Voided);
    }

    /// Each event costs delivery one statement to read what it knows (the delivery, whether
    /// the order was voided and, for a new delivery, its id) and one to store the outcome: on
    /// PostgreSQL a statement is a round trip. The new delivery gets id 1.
    #[tokio::test]
    async fn an_event_costs_one_read_and_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("d.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        let placed = Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id: 4,
                product_id: 1,
                product_name: None,
                quantity: 1,
                price: None,
                customer_id: "c".into(),
                customer_name: None,
                customer_addr: None,
            }),
        );
        let completed = Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id: 4,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        );
        for event in [placed, completed] {
            let event_type = event.event_type();
            let statements = db
                .write(move |conn| {
                    let (caused, statements) = kafka::db::counting_statements(conn, |conn| {
                        DeliveryReactor.react(conn, &event)
                    });
                    Ok::<_, ReactError>((statements, caused?))
                })
                .await
                .unwrap();
            assert_eq!(statements, 2, "{event_type}: one read, one write");
        }
        let delivery = db
            .read(|conn| store::by_id(conn, 1).map_err(kafka::DbError::from))
            .await
            .unwrap()
            .expect("delivery 1");
        assert_eq!((delivery.order_id, delivery.order_confirmed), (4, true));
    }
}
