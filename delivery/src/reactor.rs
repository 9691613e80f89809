//! The I/O shell around [`crate::saga::react`].

use crate::saga::OrderDelivery;
use crate::{saga, store};
use events::{Envelope, Event};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};

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
        let before = store::by_order(conn, order_id)?;
        // A statement (a round trip on PostgreSQL) only when the rule starts a delivery; no
        // other rule reads the id.
        let next_id = if saga::starts_a_delivery(&before, event) {
            store::next_id(conn)?
        } else {
            0
        };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::Connection;
    use events::{OrderCompleted, OrderPlaced, Service};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Only an OrderPlaced that starts a delivery asks for the next delivery id; the order's
    /// other events (OrderCompleted here) cost no such statement.
    #[tokio::test]
    async fn only_a_new_delivery_reads_the_next_id() {
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
        let max_reads = Arc::new(AtomicUsize::new(0));
        for event in [placed, completed] {
            let counter = max_reads.clone();
            db.write(move |conn| {
                conn.set_instrumentation(move |e: diesel::connection::InstrumentationEvent<'_>| {
                    if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = e
                        && query.to_string().contains("sqlite_sequence")
                    {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
                let caused = DeliveryReactor.react(conn, &event);
                conn.set_instrumentation(None::<Box<dyn diesel::connection::Instrumentation>>);
                Ok::<_, ReactError>(((), caused?))
            })
            .await
            .unwrap();
        }
        assert_eq!(max_reads.load(Ordering::SeqCst), 1, "OrderPlaced only");
    }
}
