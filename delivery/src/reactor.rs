//! The I/O shell around [`crate::saga::react`].

use crate::{saga, store};
use diesel::sqlite::SqliteConnection;
use events::{Envelope, Event};
use kafka::{ReactError, Reactor};

/// Delivery's reaction to OrderPlaced, OrderCompleted and OrderCancelled.
pub struct DeliveryReactor;

impl Reactor for DeliveryReactor {
    fn wants(&self, event: &Envelope) -> bool {
        matches!(
            event.event,
            Event::OrderPlaced(_) | Event::OrderCompleted(_) | Event::OrderCancelled(_)
        )
    }

    fn react(
        &self,
        conn: &mut SqliteConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        let Some(order_id) = event.event.order_id() else {
            return Ok(Vec::new());
        };
        let before = store::by_order(conn, order_id)?;
        let (after, caused) = saga::react(before.clone(), event, store::next_id(conn)?);
        if let Some(delivery) = after.filter(|d| Some(d) != before.as_ref()) {
            store::save(conn, &delivery)?;
        }
        Ok(caused)
    }
}
