//! Products' part of rebuilding its database from the topic ([`kafka::rebuild`] reads the
//! topic into an empty database, records the consumed ids and stores the positions at the
//! ends): how each event read back changes the catalog and the reservations. Nothing is
//! re-decided and nothing is published. Per event type:
//!
//! - ProductChanged (products'): the product as it was then — name, price and stock are
//!   absolute; a new id is inserted with it. Every stock change (creation, PATCH, the seed, a
//!   reservation, a release) published one, keyed by product, so the last one read carries
//!   the stock the product has now, also with several partitions.
//! - StockDecreased, StockIncreased, ProductOutOfStock (products'): the order's reservation
//!   becomes Reserved, Released or Rejected, as decided ([`saga::replay`]); the last of an
//!   order's decisions (one partition, commit order) stands, also over a Voided set by a
//!   cancel that reached the topic before products' decision did.
//! - OrderPlaced: nothing; products' decision on it is on the topic (above).
//! - OrderCancelled, DeliveryCancelled: through [`saga::react`] only where it publishes
//!   nothing — an order cancelled before products decided is Voided (a late OrderPlaced
//!   reserves nothing); a release published StockIncreased, applied as such.
//! - DeliveryCompleted: through [`saga::react`]: a Reserved reservation is settled Delivered
//!   (products publishes nothing for it).
//! - Anything else: nothing.
//!
//! The counters `reserved` and `delivered` follow from the reservations, so they are counted
//! once at the end ([`store::recount_units`]): stock + reserved + delivered is then what the
//! products' creations and stock writes made it. Product ids inserted with their ids move
//! PostgreSQL's sequence past them, so a new product takes none of them. A delivered
//! reservation live retention had deleted comes back (retention deletes it again); units
//! whose events Kafka's retention deleted cannot.

use crate::reactor::StockReactor;
use crate::saga;
use crate::store;
use diesel::QueryResult;
use events::{Envelope, Event, Service};
use kafka::db::DbConnection;
use kafka::rebuild::Rebuild;

impl Rebuild for StockReactor {
    fn service(&self) -> Service {
        Service::Products
    }

    /// No product and no reservation.
    fn is_empty(&self, conn: &mut DbConnection) -> QueryResult<bool> {
        store::is_empty(conn)
    }

    fn apply_read_back(&self, conn: &mut DbConnection, event: &Envelope) -> QueryResult<()> {
        apply(conn, event)
    }

    fn finish(&self, conn: &mut DbConnection) -> QueryResult<()> {
        store::recount_units(conn)?;
        if let Some(highest) = store::highest_product_id(conn)? {
            kafka::rebuild::issue_after(conn, "products", highest)?;
        }
        Ok(())
    }
}

/// Applies one event read back from the topic.
fn apply(conn: &mut DbConnection, event: &Envelope) -> QueryResult<()> {
    if let (Event::ProductChanged(p), Service::Products) = (&event.event, event.source) {
        return store::put_changed(conn, p);
    }
    // The view the live rule saw (react's refusals read the product; its stock is not kept).
    let view = crate::reactor::view_of(conn, event).map_err(|e| match e {
        kafka::ReactError::Db(kafka::DbError::Query(e)) => e,
        other => diesel::result::Error::DeserializationError(other.to_string().into()),
    })?;
    let Some(view) = view else {
        return Ok(());
    };
    let before = view.reservation.clone();
    match saga::replay(view, event) {
        Some(r) if Some(&r) != before.as_ref() => store::save_reservation(conn, &r),
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::saga::{Product, StockReservation};
    use crate::store::NewProduct;
    use events::{
        CancelReason, DeliveryCompleted, DeliveryState, OrderCancelled, OrderPlaced, ProductChanged,
    };
    use kafka::db::DbError;
    use kafka::{Database, ReactError, Reactor};

    fn open(dir: &tempfile::TempDir, name: &str) -> Database {
        let url = dir.path().join(name);
        Database::open(
            url.to_str().expect("utf-8 path"),
            crate::startup::MIGRATIONS,
        )
        .expect("database")
    }

    /// An OrderPlaced for `quantity` units of `product_id` (the products tests' one).
    pub(crate) fn placed(order_id: i64, product_id: i64, quantity: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id,
                product_id,
                product_name: None,
                quantity,
                price: None,
                customer_id: "c".into(),
                customer_name: None,
                customer_addr: None,
            }),
        )
    }

    fn cancelled(order_id: i64, product_id: i64, quantity: i64, by: Service) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelled(OrderCancelled {
                order_id,
                product_id,
                quantity,
                customer_id: "c".into(),
                state_message: "x".into(),
                reason: Some(CancelReason::Customer),
            }),
        )
        .initiated_by(by)
    }

    fn delivered(order_id: i64) -> Envelope {
        Envelope::new(
            Service::Delivery,
            Event::DeliveryCompleted(DeliveryCompleted {
                delivery_id: order_id,
                order_id,
                delivery_state: DeliveryState::Completed,
            }),
        )
    }

    /// The live products: its writes and its consumer, and the topic they make.
    struct Live {
        db: Database,
        topic: Vec<Envelope>,
    }

    impl Live {
        /// The consumer applies `incoming` (already on the topic); returns what it caused,
        /// for the caller to put on the topic (now or after other events).
        async fn consume(&mut self, incoming: Envelope) -> Vec<Envelope> {
            self.topic.push(incoming.clone());
            self.db
                .write(move |conn| {
                    let caused = StockReactor.react(conn, &incoming)?;
                    Ok::<_, ReactError>((caused, Vec::new()))
                })
                .await
                .expect("applied")
        }

        async fn consume_and_publish(&mut self, incoming: Envelope) {
            let caused = self.consume(incoming).await;
            self.topic.extend(caused);
        }

        /// A catalog write (creation, PATCH) and its ProductChanged.
        async fn write_product(&mut self, name: &'static str, stock: i64, id: Option<i64>) {
            let changed = self
                .db
                .write(move |conn| {
                    let product = match id {
                        None => store::insert_product(
                            conn,
                            &NewProduct {
                                name,
                                price: 100,
                                stock,
                            },
                        )?,
                        Some(id) => {
                            let mut p = store::product(conn, id)?.expect("the product");
                            p.stock = stock;
                            store::save_product(conn, &p)?;
                            p
                        }
                    };
                    Ok::<_, DbError>((Envelope::new(Service::Products, product.changed()), vec![]))
                })
                .await
                .expect("written");
            self.topic.push(changed);
        }
    }

    type State = (Vec<Product>, Vec<StockReservation>);

    async fn state(db: &Database) -> State {
        db.read(|conn| {
            let page = kafka::http::Page {
                after: 0,
                limit: 1000,
            };
            Ok::<_, DbError>((
                store::products_page(conn, page)?,
                store::reservations(conn, page)?,
            ))
        })
        .await
        .expect("read")
    }

    /// Replays `topic` into `db` as a rebuild does, finish included.
    async fn rebuild(db: &Database, topic: Vec<Envelope>) {
        db.write(move |conn| {
            assert!(StockReactor.is_empty(conn)?);
            for event in &topic {
                StockReactor.apply_read_back(conn, event)?;
            }
            StockReactor.finish(conn)?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .expect("rebuilt");
    }

    /// Products rebuilt from the topic the live products made holds exactly its catalog
    /// (stock, reserved, delivered) and reservations: a delivered order, a released one, an
    /// out-of-stock one (and the cancel products started), a reservation still held, an order
    /// voided by an early cancel, a cancel that reached the topic before products' own
    /// StockDecreased, a PATCH and a product nobody ordered.
    #[tokio::test]
    async fn a_rebuilt_products_holds_what_the_live_one_holds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut live = Live {
            db: open(&dir, "live.db"),
            topic: Vec::new(),
        };
        live.write_product("TV", 10, None).await; // id 1
        live.write_product("CLOCK", 50, None).await; // id 2
        live.write_product("MASK", 5, None).await; // id 3, never ordered
        // 1: delivered
        live.consume_and_publish(placed(1, 1, 2)).await;
        live.consume_and_publish(delivered(1)).await;
        // 2: released by the customer's cancel
        live.consume_and_publish(placed(2, 1, 3)).await;
        live.consume_and_publish(cancelled(2, 1, 3, Service::Orders))
            .await;
        // 3: out of stock, and the cancel products' refusal started
        live.consume_and_publish(placed(3, 1, 100)).await;
        live.consume_and_publish(cancelled(3, 1, 100, Service::Products))
            .await;
        // 4: still reserved
        live.consume_and_publish(placed(4, 2, 4)).await;
        // 5: cancelled before its OrderPlaced arrived: voided, the late one reserves nothing
        live.consume_and_publish(cancelled(5, 2, 1, Service::Orders))
            .await;
        live.consume_and_publish(placed(5, 2, 1)).await;
        // 6: the cancel reaches the topic before products' StockDecreased for the order
        let decided = live.consume(placed(6, 1, 1)).await;
        let released = live.consume(cancelled(6, 1, 1, Service::Orders)).await;
        live.topic.extend(decided);
        live.topic.extend(released);
        // a PATCH of CLOCK's stock
        live.write_product("CLOCK", 60, Some(2)).await;

        let expected = state(&live.db).await;
        let rebuilt = open(&dir, "rebuilt.db");
        rebuild(&rebuilt, live.topic.clone()).await;
        assert_eq!(state(&rebuilt).await, expected);
        // the live figures the comparison stands on
        let (products, reservations) = &expected;
        let units = |id: i64| {
            let p = products.iter().find(|p| p.id == id).expect("product");
            (p.stock, p.reserved, p.delivered)
        };
        assert_eq!(units(1), (8, 0, 2));
        assert_eq!(units(2), (60, 4, 0));
        assert_eq!(units(3), (5, 0, 0));
        let states: Vec<&str> = reservations.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(
            states,
            [
                "Delivered",
                "Released",
                "Rejected",
                "Reserved",
                "Voided",
                "Released"
            ]
        );
        // A new product after the rebuild takes an id after the rebuilt ones.
        let next = rebuilt
            .write(|conn| {
                let new = NewProduct {
                    name: "NEW",
                    price: 1,
                    stock: 1,
                };
                Ok::<_, DbError>((store::insert_product(conn, &new)?.id, Vec::new()))
            })
            .await
            .expect("inserted");
        assert_eq!(next, 4);
    }

    /// A ProductChanged read back sets name, price and stock and inserts a new id with it.
    #[tokio::test]
    async fn product_changed_is_the_product_as_it_was_then() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(&dir, "p.db");
        let changed = |stock| {
            Envelope::new(
                Service::Products,
                Event::ProductChanged(ProductChanged {
                    product_id: 7,
                    product_name: "LAMP".into(),
                    product_price: 5,
                    product_stock: stock,
                }),
            )
        };
        rebuild(&db, vec![changed(3), changed(9)]).await;
        let (products, _) = state(&db).await;
        assert_eq!(
            products,
            [Product {
                id: 7,
                name: "LAMP".into(),
                price: 5,
                stock: 9,
                reserved: 0,
                delivered: 0
            }]
        );
    }
}
