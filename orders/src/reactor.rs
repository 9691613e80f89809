//! The I/O shell around [`crate::saga::react`]: every saga event of products and delivery is
//! appended to its order's history, then the rule runs; ProductChanged updates the catalog
//! replica. Orders' own events are not read back: they entered the history, and a saga's end
//! was timed, when they were written ([`crate::history`]).

use crate::saga;
use crate::store;
use events::{Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};

/// Orders' reaction to the other services' events that concern an order or the catalog.
pub struct OrderReactor;

impl Reactor for OrderReactor {
    fn wants(&self, event: &Envelope) -> bool {
        event.source != Service::Orders
            && (event.event.order_id().is_some() || matches!(event.event, Event::ProductChanged(_)))
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
        let note = matches!(
            event.event,
            Event::EventParked(_) | Event::DeadLetterRedriven(_) | Event::DeadLetterDiscarded(_)
        );
        // A note about an event of an order orders does not have (a poison message naming a
        // made-up order) concerns nothing here; parking it in turn would only echo.
        if note && store::order(conn, order_id)?.is_none() {
            return Ok(Vec::new());
        }
        let Some(stored) = store::record_history_and_load(conn, order_id, event)? else {
            return Err(ReactError::Rejected(format!(
                "order {order_id} does not exist here"
            )));
        };
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
    use events::{OrderCompleted, StockMoved};

    fn completed(source: Service) -> Envelope {
        let event = OrderCompleted {
            order_id: 1,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
        };
        Envelope::new(source, Event::OrderCompleted(event))
    }

    #[test]
    fn orders_does_not_read_back_its_own_events() {
        assert!(!OrderReactor.wants(&completed(Service::Orders)));
        assert!(OrderReactor.wants(&completed(Service::Products)));
        let stock = StockMoved {
            order_id: 1,
            product_id: 1,
            quantity: 1,
            product_stock: 3,
        };
        let decreased = Envelope::new(Service::Products, Event::StockDecreased(stock));
        assert!(OrderReactor.wants(&decreased));
    }
}
