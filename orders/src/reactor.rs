//! The I/O shell around [`crate::saga::react`]: every saga event of products and delivery is
//! appended to its order's history, then the rule runs; ProductChanged updates the catalog
//! replica. Orders' own events are not read back: they entered the history, and a saga's end
//! was timed, when they were written ([`crate::history`]).

use crate::saga;
use crate::store;
use events::{Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};
use std::collections::{BTreeSet, HashMap};

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
        let ids: Vec<i64> = events
            .iter()
            .filter_map(|e| e.event.order_id())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
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
        for (id, order) in &now {
            if stored.get(id) != Some(order) {
                store::save_order(conn, order)?;
            }
        }
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

    fn out_of_stock(order_id: i64) -> Envelope {
        let e = events::ProductOutOfStock {
            order_id,
            product_id: 1,
            quantity: 1,
            product_stock: Some(0),
            state_message: "none left".into(),
        };
        Envelope::new(Service::Products, Event::ProductOutOfStock(e))
    }

    fn started(order_id: i64) -> Envelope {
        let e = events::DeliveryStarted {
            delivery_id: 100 + order_id,
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
            customer_name: None,
            delivery_address: None,
            delivery_state: events::DeliveryState::Started,
        };
        Envelope::new(Service::Delivery, Event::DeliveryStarted(e))
    }

    fn courier_cancelled(order_id: i64) -> Envelope {
        let e = events::DeliveryCancelled {
            delivery_id: 100 + order_id,
            order_id,
            product_id: 1,
            quantity: 1,
            delivery_state: events::DeliveryState::Cancelled,
            state_message: "courier".into(),
        };
        Envelope::new(Service::Delivery, Event::DeliveryCancelled(e))
            .initiated_by(Service::Delivery)
    }

    fn changed(product_id: i64, stock: i64) -> Envelope {
        let e = events::ProductChanged {
            product_id,
            product_name: format!("p{product_id}"),
            product_price: 10,
            product_stock: stock,
        };
        Envelope::new(Service::Products, Event::ProductChanged(e))
    }

    /// One way to apply a batch: event by event, or at once.
    type Apply = fn(&mut DbConnection, &[Envelope]) -> Result<Vec<Vec<Envelope>>, ReactError>;

    /// What a run left: each event's caused events (ids and times aside), each order, its
    /// history's event ids, and the catalog replica's stock.
    type Outcome = (
        Vec<Vec<(Event, Option<String>, Option<Service>)>>,
        Vec<(saga::Order, Vec<String>)>,
        Vec<(i64, i64)>,
    );

    /// `events` applied by `apply` in one write, on four pending orders.
    async fn run(events: Vec<Envelope>, apply: Apply) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("o.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        db.write(move |conn| {
            for _ in 1..=4 {
                let at = chrono::Utc::now().to_rfc3339();
                store::insert_order(conn, &store::NewOrder::fixture("OrderPlaced", at))?;
            }
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
            let mut orders = Vec::new();
            for id in 1..=4 {
                let order = store::order(conn, id)?.expect("the order").order;
                let history = store::history(conn, id)?
                    .into_iter()
                    .map(|h| h.event_id)
                    .collect();
                orders.push((order, history));
            }
            let page = kafka::http::Page {
                after: 0,
                limit: 100,
            };
            let replica = store::replica(conn, page)?
                .into_iter()
                .map(|p| (p.id, p.stock))
                .collect();
            Ok::<_, ReactError>(((caused, orders, replica), Vec::new()))
        })
        .await
        .unwrap()
    }

    /// A batch decided at once leaves the orders, histories and replica its events leave one
    /// by one, and causes the same events: a completion from both confirmations, an out of
    /// stock cancel, a courier's cancel after a start, a repeat, ProductChanged in a row.
    #[tokio::test]
    async fn a_batch_at_once_does_what_its_events_do_one_by_one() {
        let repeat = started(1);
        let events = vec![
            decreased(1),
            changed(1, 9),
            repeat.clone(),
            out_of_stock(2),
            changed(2, 5),
            started(3),
            changed(1, 8),
            courier_cancelled(3),
            repeat,
            decreased(4),
            changed(1, 7),
        ];
        let one_by_one = run(events.clone(), |conn, events| {
            events.iter().map(|e| OrderReactor.react(conn, e)).collect()
        })
        .await;
        let at_once = run(events, |conn, events| {
            OrderReactor.react_all(conn, &events.iter().collect::<Vec<_>>())
        })
        .await;
        assert_eq!(at_once, one_by_one);
        let (caused, orders, replica) = &at_once;
        let states: Vec<_> = orders.iter().map(|(o, _)| o.state).collect();
        use saga::OrderState::{Cancelled, Completed, Placed};
        assert_eq!(
            states,
            [Completed, Cancelled, Cancelled, Placed],
            "{caused:?}"
        );
        assert_eq!(replica, &[(1, 7), (2, 5)]);
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
