//! The I/O shell around [`crate::saga::react`].

use crate::saga::OrderDelivery;
use crate::{saga, store};
use events::{Envelope, Event};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};
use std::collections::HashMap;

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
    /// deliveries it starts drawn in one, the rule run on each event in memory, and the
    /// changed deliveries stored at once ([`store::save_all`]).
    fn react_all(
        &self,
        conn: &mut DbConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Vec<Envelope>>, ReactError> {
        let ids = kafka::inbox::orders_of(events);
        let stored = store::by_orders(conn, &ids)?;
        // The rule is pure: a dry run says how many deliveries the batch starts.
        let starts = run(stored.clone(), events, &mut std::iter::repeat(0)).1;
        let mut new_ids = store::next_ids(conn, starts)?.into_iter();
        let (now, drawn, caused) = run(stored.clone(), events, &mut new_ids);
        debug_assert_eq!(drawn, starts);
        let mut changed = Vec::new();
        for (order_id, delivery) in &now {
            if stored.get(order_id) == Some(delivery) {
                continue;
            }
            match delivery {
                OrderDelivery::Known(delivery) => changed.push(delivery),
                OrderDelivery::Voided => store::void(conn, *order_id)?,
                OrderDelivery::Unknown => {}
            }
        }
        changed.sort_by_key(|d| d.id);
        store::save_all(conn, &changed)?;
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
    use events::{OrderCompleted, OrderPlaced, Service};

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
