//! The I/O shell around [`crate::saga::react`]: load what products knows about the event's
//! order, run the rule, store what changed.

use crate::saga::{self, StockView};
use crate::store;
use events::{Envelope, Event};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};

/// Products' reaction to OrderPlaced, OrderCancelled, DeliveryCancelled and DeliveryCompleted.
pub struct StockReactor;

impl Reactor for StockReactor {
    fn wants(&self, event: &Envelope) -> bool {
        matches!(
            event.event,
            Event::OrderPlaced(_)
                | Event::OrderCancelled(_)
                | Event::DeliveryCancelled(_)
                | Event::DeliveryCompleted(_)
        )
    }

    fn react(
        &self,
        conn: &mut DbConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        let Some(before) = view_of(conn, event)? else {
            return Ok(Vec::new());
        };
        let (after, caused) = saga::react(before.clone(), event);
        if let Some(product) = after
            .product
            .as_ref()
            .filter(|p| Some(*p) != before.product.as_ref())
        {
            store::save_product(conn, product)?;
        }
        if let Some(r) = after
            .reservation
            .as_ref()
            .filter(|r| Some(*r) != before.reservation.as_ref())
        {
            store::save_reservation(conn, r)?;
        }
        Ok(caused)
    }
}

/// What products knows about `event`'s order: its reservation, and the product the rule reads
/// (the reservation's, else the one an OrderPlaced names). `None` for an event of no order.
pub(crate) fn view_of(
    conn: &mut DbConnection,
    event: &Envelope,
) -> Result<Option<StockView>, ReactError> {
    let Some(order_id) = event.event.order_id() else {
        return Ok(None);
    };
    let reservation = store::reservation(conn, order_id)?;
    let product_id = match (&event.event, &reservation) {
        (_, Some(r)) => Some(r.product_id),
        (Event::OrderPlaced(placed), None) => Some(placed.product_id),
        _ => None,
    };
    let product = match product_id {
        Some(id) => store::product_to_change(conn, id)?,
        None => None,
    };
    Ok(Some(StockView {
        product,
        reservation,
    }))
}
