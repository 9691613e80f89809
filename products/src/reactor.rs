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
    // Every saga's first event here names its product: lock it, then read it and the
    // reservation in one statement. An unknown product, or a reservation of another product,
    // takes the general way below.
    if let Event::OrderPlaced(placed) = &event.event
        && let Some((product, reservation)) =
            store::product_to_change_with_reservation(conn, placed.product_id, order_id)?
        && reservation
            .as_ref()
            .is_none_or(|r| r.product_id == placed.product_id)
    {
        return Ok(Some(StockView {
            product: Some(product),
            reservation,
        }));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use events::{OrderPlaced, Service};

    /// An OrderPlaced costs products one statement to read the product and the order's
    /// reservation (after the product's lock, a statement of its own on PostgreSQL only) and
    /// one to store each of them: on PostgreSQL a statement is a round trip.
    #[tokio::test]
    async fn an_order_placed_costs_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("p.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        let product = db
            .write(|conn| {
                let p = store::insert_product(
                    conn,
                    &store::NewProduct {
                        name: "TV",
                        price: 100,
                        stock: 5,
                    },
                )?;
                Ok::<_, kafka::DbError>((p.id, Vec::new()))
            })
            .await
            .unwrap();
        let placed = Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id: 7,
                product_id: product,
                product_name: None,
                quantity: 2,
                price: None,
                customer_id: "c".into(),
                customer_name: None,
                customer_addr: None,
            }),
        );
        let statements = db
            .write(move |conn| {
                let (caused, statements) =
                    kafka::db::counting_statements(conn, |conn| StockReactor.react(conn, &placed));
                Ok::<_, ReactError>((statements, caused?))
            })
            .await
            .unwrap();
        assert_eq!(
            statements, 3,
            "one read, the product and the reservation stored"
        );
        let (stock, reservation) = db
            .read(move |conn| {
                Ok::<_, ReactError>((
                    store::product(conn, product)?.map(|p| (p.stock, p.reserved)),
                    store::reservation(conn, 7)?.map(|r| r.quantity),
                ))
            })
            .await
            .unwrap();
        assert_eq!((stock, reservation), (Some((3, 2)), Some(2)));
    }
}
