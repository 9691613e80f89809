//! The I/O shell around [`crate::saga::react`]: load what products knows about the event's
//! order, run the rule, store what changed — per event, or for a consumer's whole batch at
//! once ([`Reactor::react_all`]), which is how PostgreSQL batches come.

use crate::saga::{self, Product, StockReservation, StockView};
use crate::store;
use events::{Envelope, Event};
use kafka::db::DbConnection;
use kafka::{ReactError, Reactor};
use std::collections::{BTreeSet, HashMap};

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

    /// The batch's reservations in one statement, its products locked and read in one, the
    /// rule run on each event in memory, and each changed row written once. A product's lock
    /// is held from that read to the commit: a few statements, not four per event, so the
    /// instances sharing a product take turns briefly.
    fn react_all(
        &self,
        conn: &mut DbConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Vec<Envelope>>, ReactError> {
        let reservations = store::reservations_of(conn, &kafka::inbox::orders_of(events))?;
        let wanted: BTreeSet<i64> = events
            .iter()
            .filter_map(|e| {
                let reservation = e.event.order_id().and_then(|id| reservations.get(&id));
                product_read(e, reservation)
            })
            .collect();
        let products = store::products_to_change(conn, &wanted)?;
        let mut batch = Batch {
            stored: StockState {
                products: products.clone(),
                reservations: reservations.clone(),
            },
            now: StockState {
                products,
                reservations,
            },
            locked: wanted,
        };
        let caused = events
            .iter()
            .map(|event| batch.react(conn, event))
            .collect::<Result<Vec<_>, _>>()?;
        let Batch { stored, now, .. } = batch;
        for product in now.products.values() {
            if stored.products.get(&product.id) != Some(product) {
                store::save_product(conn, product)?;
            }
        }
        let changed: Vec<&StockReservation> = now
            .reservations
            .values()
            .filter(|r| stored.reservations.get(&r.order_id) != Some(*r))
            .collect();
        store::save_reservations(conn, &changed)?;
        Ok(caused)
    }
}

/// Products' rows a batch has read, by product and by order.
#[derive(Debug, Default)]
struct StockState {
    products: HashMap<i64, Product>,
    reservations: HashMap<i64, StockReservation>,
}

/// A consumer's batch in memory: the rows as stored, as the rule has left them so far, and
/// the products whose locks the transaction holds.
struct Batch {
    stored: StockState,
    now: StockState,
    locked: BTreeSet<i64>,
}

impl Batch {
    /// [`saga::react`] on what the batch holds; a product it did not lock at the start (an
    /// event the first read could not foresee) is locked and read now.
    fn react(
        &mut self,
        conn: &mut DbConnection,
        event: &Envelope,
    ) -> Result<Vec<Envelope>, ReactError> {
        let Some(order_id) = event.event.order_id() else {
            return Ok(Vec::new());
        };
        let reservation = self.now.reservations.get(&order_id).cloned();
        let product = match product_read(event, reservation.as_ref()) {
            Some(id) if !self.locked.contains(&id) => {
                self.locked.insert(id);
                let product = store::product_to_change(conn, id)?;
                if let Some(p) = &product {
                    self.stored.products.insert(id, p.clone());
                    self.now.products.insert(id, p.clone());
                }
                product
            }
            Some(id) => self.now.products.get(&id).cloned(),
            None => None,
        };
        let (after, caused) = saga::react(
            StockView {
                product,
                reservation,
            },
            event,
        );
        if let Some(p) = after.product {
            self.now.products.insert(p.id, p);
        }
        if let Some(r) = after.reservation {
            self.now.reservations.insert(r.order_id, r);
        }
        Ok(caused)
    }
}

/// The product the rule reads for `event`: its order's reservation's, else the one an
/// OrderPlaced names.
fn product_read(event: &Envelope, reservation: Option<&StockReservation>) -> Option<i64> {
    match (&event.event, reservation) {
        (_, Some(r)) => Some(r.product_id),
        (Event::OrderPlaced(placed), None) => Some(placed.product_id),
        _ => None,
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
    let product = match product_read(event, reservation.as_ref()) {
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
    use crate::rebuild::tests::placed;

    /// A batch of OrderPlaced for one product reads the reservations and the product once,
    /// locks the product once, and stores each changed row once.
    #[tokio::test]
    async fn a_batch_reads_and_writes_each_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("p.db");
        let db = kafka::Database::open(url.to_str().unwrap(), crate::startup::MIGRATIONS).unwrap();
        let events: Vec<Envelope> = (1..=10).map(|order| placed(order, 1, 1)).collect();
        let statements = db
            .write(move |conn| {
                store::insert_product(
                    conn,
                    &store::NewProduct {
                        name: "TV",
                        price: 1,
                        stock: 100,
                    },
                )?;
                let refs: Vec<&Envelope> = events.iter().collect();
                let (caused, statements) = kafka::db::counting_statements(conn, |conn| {
                    StockReactor.react_all(conn, &refs)
                });
                assert_eq!(caused?.len(), 10);
                Ok::<_, ReactError>((statements, Vec::new()))
            })
            .await
            .unwrap();
        // SQLite: the reservations, the product (its lock is PostgreSQL's), the product
        // stored, the ten reservations stored (one statement on PostgreSQL).
        assert_eq!(statements, 1 + 1 + 1 + 10);
    }

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
        let placed = placed(7, product, 2);
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
