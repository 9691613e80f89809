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
        let (after, caused) = saga::react(before.clone(), event, store::next_id(conn)?);
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
