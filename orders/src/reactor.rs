//! The I/O shell around [`crate::saga::react`]: every saga event of products and delivery is
//! appended to its order's history, then the rule runs; ProductChanged updates the catalog
//! replica. Orders' own events are not read back: they entered the history, and a saga's end
//! was timed, when they were written ([`crate::history`]).

use crate::saga;
use crate::store;
use events::{Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};
use std::collections::HashMap;

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
        // A note about an event of an order orders does not have (a poison message naming a
        // made-up order) concerns nothing here; parking it in turn would only echo.
        if is_note(event) && store::order(conn, order_id)?.is_none() {
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

    /// The batch's orders loaded in one statement, its events recorded in their histories in
    /// one, the rule run on each in memory, each changed order stored once, and the catalog
    /// replica written once per product (its last ProductChanged in the batch).
    fn react_all(
        &self,
        conn: &mut DbConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Vec<Envelope>>, ReactError> {
        let ids = kafka::inbox::orders_of(events);
        let stored = store::orders_by_ids(conn, &ids)?;
        let mut now = stored.clone();
        let last_change: HashMap<i64, usize> = events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.event {
                Event::ProductChanged(p) => Some((p.product_id, i)),
                _ => None,
            })
            .collect();
        let mut history = Vec::new();
        let mut caused = Vec::with_capacity(events.len());
        for (i, &event) in events.iter().enumerate() {
            if let Event::ProductChanged(p) = &event.event {
                if last_change.get(&p.product_id) == Some(&i) {
                    store::upsert_product(conn, p)?;
                }
                caused.push(Vec::new());
                continue;
            }
            let Some(order_id) = event.event.order_id() else {
                caused.push(Vec::new());
                continue;
            };
            let Some(order) = now.get(&order_id).cloned() else {
                if is_note(event) {
                    caused.push(Vec::new());
                    continue;
                }
                return Err(ReactError::Rejected(format!(
                    "order {order_id} does not exist here"
                )));
            };
            history.push((order_id, event));
            let (after, events) = saga::react(order, event);
            now.insert(order_id, after);
            caused.push(events);
        }
        store::record_histories(conn, &history)?;
        let changed: Vec<&saga::Order> = now
            .iter()
            .filter(|(id, order)| stored.get(id) != Some(*order))
            .map(|(_, order)| order)
            .collect();
        store::save_orders(conn, &changed)?;
        Ok(caused)
    }
}

/// A note about a parked event (parked, redriven, discarded): recorded in its order's history
/// when orders has the order, else nothing to do.
fn is_note(event: &Envelope) -> bool {
    matches!(
        event.event,
        Event::EventParked(_) | Event::DeadLetterRedriven(_) | Event::DeadLetterDiscarded(_)
    )
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

    fn decreased(order_id: i64) -> Envelope {
        let stock = StockMoved {
            order_id,
            product_id: 1,
            quantity: 1,
            product_stock: 3,
        };
        Envelope::new(Service::Products, Event::StockDecreased(stock))
    }

    /// An event of an order orders does not have rejects the batch, as it rejects the event.
    #[tokio::test]
    async fn a_batch_with_an_unknown_order_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("o.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        let events = [decreased(404)];
        let result = db
            .write(move |conn| {
                let refs: Vec<&Envelope> = events.iter().collect();
                Ok::<_, ReactError>((OrderReactor.react_all(conn, &refs), Vec::new()))
            })
            .await
            .unwrap();
        assert!(matches!(result, Err(ReactError::Rejected(_))), "{result:?}");
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
