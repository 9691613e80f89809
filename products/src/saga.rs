//! Products' saga rules as pure functions: (what products knows, incoming event) → (what it
//! knows now, events to publish). No I/O here; [`crate::reactor`] loads and stores around it.

use events::{
    Envelope, Event, OrderPlaced, ProductChanged, ProductOutOfStock, Service, StockMoved,
};

/// A catalog entry; serialised as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Product {
    /// Product id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Unit price.
    pub price: i64,
    /// Units on hand, not counting reserved ones.
    pub stock: i64,
    /// Units held for orders in flight (reservations `Reserved`).
    pub reserved: i64,
    /// Units gone with completed deliveries. The saga moves units between `stock`,
    /// `reserved` and `delivered` and never creates or destroys one: only a stock write does.
    pub delivered: i64,
}

impl Product {
    /// The catalog event that tells replicas this product's current state.
    pub fn changed(&self) -> Event {
        Event::ProductChanged(ProductChanged {
            product_id: self.id,
            product_name: self.name.clone(),
            product_price: self.price,
            product_stock: self.stock,
        })
    }
}

/// Where an order's stock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    /// Units were taken from stock for the order.
    Reserved,
    /// The reserved units went back to stock; never again.
    Released,
    /// Nothing was taken: out of stock or unknown product.
    Rejected,
    /// The delivery completed: the units left the warehouse for good and are never released.
    Delivered,
    /// The order was cancelled before its OrderPlaced arrived here (a relay retry can
    /// reorder one order's events): a later OrderPlaced reserves nothing.
    Voided,
}

impl ReservationState {
    /// The stored and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Reserved => "Reserved",
            ReservationState::Released => "Released",
            ReservationState::Rejected => "Rejected",
            ReservationState::Delivered => "Delivered",
            ReservationState::Voided => "Voided",
        }
    }

    /// Parses the stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Reserved,
            Self::Released,
            Self::Rejected,
            Self::Delivered,
            Self::Voided,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

impl serde::Serialize for ReservationState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What products decided for one order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StockReservation {
    /// The order.
    pub order_id: i64,
    /// The product reserved from.
    pub product_id: i64,
    /// Units reserved (or asked for, when rejected).
    pub quantity: i64,
    /// Where it stands.
    pub state: ReservationState,
}

/// What products knows about one order when an event for it arrives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StockView {
    /// The ordered product, if it exists.
    pub product: Option<Product>,
    /// The order's reservation, if products has decided on it.
    pub reservation: Option<StockReservation>,
}

/// Applies one saga event to products' view of its order.
pub fn react(view: StockView, incoming: &Envelope) -> (StockView, Vec<Envelope>) {
    match &incoming.event {
        Event::OrderPlaced(order) => reserve(view, order, incoming),
        // Rule 7: release on either compensation, once, and never for a chain products started
        // (it reserved nothing then).
        Event::OrderCancelled(_) | Event::DeliveryCancelled(_) => {
            if incoming.initiated_by_service(Service::Products) {
                (view, Vec::new())
            } else {
                release(view, incoming)
            }
        }
        // Rule 11: delivered units are settled: no longer reserved, never released.
        Event::DeliveryCompleted(_) => settle(view),
        _ => (view, Vec::new()),
    }
}

/// Rule 2: reserve the ordered units, or refuse with ProductOutOfStock and touch nothing.
fn reserve(
    view: StockView,
    order: &OrderPlaced,
    incoming: &Envelope,
) -> (StockView, Vec<Envelope>) {
    if view.reservation.is_some() {
        return (view, Vec::new()); // already decided for this order
    }
    let reservation = |state| StockReservation {
        order_id: order.order_id,
        product_id: order.product_id,
        quantity: order.quantity,
        state,
    };
    let refusal = match &view.product {
        None => Some(format!("product {} does not exist", order.product_id)),
        Some(_) if order.quantity <= 0 => Some(format!("invalid quantity {}", order.quantity)),
        Some(p) if p.stock < order.quantity => Some(format!(
            "only {} of {} in stock, {} ordered",
            p.stock, p.name, order.quantity
        )),
        Some(_) => None,
    };
    if let Some(state_message) = refusal {
        let event = Event::ProductOutOfStock(ProductOutOfStock {
            order_id: order.order_id,
            product_id: order.product_id,
            quantity: order.quantity,
            product_stock: view.product.as_ref().map(|p| p.stock),
            state_message,
        });
        let out = Envelope::new(Service::Products, event)
            .caused_by(incoming)
            .initiated_by(Service::Products);
        let view = StockView {
            reservation: Some(reservation(ReservationState::Rejected)),
            ..view
        };
        return (view, vec![out]);
    }
    let Some(mut product) = view.product else {
        return (StockView::default(), Vec::new()); // unreachable: refused above
    };
    product.stock -= order.quantity;
    product.reserved += order.quantity;
    let events = stock_moved(&product, order.order_id, order.quantity, incoming, true);
    let view = StockView {
        product: Some(product),
        reservation: Some(reservation(ReservationState::Reserved)),
    };
    (view, events)
}

/// Returns a reservation's units to stock, whatever the stock is now (the Java original's
/// `stock - quantity > 0` check skipped legitimate restores). A cancel that arrives before
/// anything was decided voids the order here, so a late OrderPlaced reserves nothing.
fn release(view: StockView, incoming: &Envelope) -> (StockView, Vec<Envelope>) {
    if view.reservation.is_none() {
        let (product_id, quantity) = match &incoming.event {
            Event::OrderCancelled(e) => (e.product_id, e.quantity),
            Event::DeliveryCancelled(e) => (e.product_id, e.quantity),
            _ => return (view, Vec::new()),
        };
        let voided = StockReservation {
            order_id: incoming.event.order_id().unwrap_or_default(),
            product_id,
            quantity,
            state: ReservationState::Voided,
        };
        return (
            StockView {
                reservation: Some(voided),
                ..view
            },
            Vec::new(),
        );
    }
    let (Some(mut product), Some(mut reservation)) =
        (view.product.clone(), view.reservation.clone())
    else {
        return (view, Vec::new());
    };
    if reservation.state != ReservationState::Reserved {
        return (view, Vec::new()); // released already, or nothing was reserved
    }
    product.stock += reservation.quantity;
    product.reserved -= reservation.quantity;
    reservation.state = ReservationState::Released;
    let events = stock_moved(
        &product,
        reservation.order_id,
        reservation.quantity,
        incoming,
        false,
    );
    let view = StockView {
        product: Some(product),
        reservation: Some(reservation),
    };
    (view, events)
}

/// Settles a reservation whose delivery completed: its units move from reserved to
/// delivered.
fn settle(view: StockView) -> (StockView, Vec<Envelope>) {
    match view.reservation {
        Some(mut r) if r.state == ReservationState::Reserved => {
            r.state = ReservationState::Delivered;
            let product = view.product.map(|mut p| {
                p.reserved -= r.quantity;
                p.delivered += r.quantity;
                p
            });
            (
                StockView {
                    product,
                    reservation: Some(r),
                },
                Vec::new(),
            )
        }
        _ => (view, Vec::new()),
    }
}

/// A rebuild's rule ([`crate::rebuild`]): an order's reservation after `event` read back from
/// the topic. Products' own StockDecreased, StockIncreased and ProductOutOfStock are what it
/// decided, taken as facts (in the order products committed them, so the last one stands);
/// the other services' events go through [`react`] and count only where the rule publishes
/// nothing — voiding an order cancelled before any decision, settling a delivered one —
/// since every decision that published something is on the topic itself. Stock and the
/// unit counters are not taken from here: the last ProductChanged carries the stock, and
/// the counters follow from the reservations.
pub fn replay(view: StockView, event: &Envelope) -> Option<StockReservation> {
    let fact = |order_id, product_id, quantity, state| {
        Some(StockReservation {
            order_id,
            product_id,
            quantity,
            state,
        })
    };
    match (&event.event, event.source) {
        (Event::StockDecreased(m), Service::Products) => fact(
            m.order_id,
            m.product_id,
            m.quantity,
            ReservationState::Reserved,
        ),
        (Event::StockIncreased(m), Service::Products) => fact(
            m.order_id,
            m.product_id,
            m.quantity,
            ReservationState::Released,
        ),
        (Event::ProductOutOfStock(e), Service::Products) => fact(
            e.order_id,
            e.product_id,
            e.quantity,
            ReservationState::Rejected,
        ),
        (_, Service::Products) => view.reservation,
        _ => {
            let (after, caused) = react(view.clone(), event);
            if caused.is_empty() {
                after.reservation
            } else {
                view.reservation
            }
        }
    }
}

fn stock_moved(
    product: &Product,
    order_id: i64,
    quantity: i64,
    incoming: &Envelope,
    decreased: bool,
) -> Vec<Envelope> {
    let moved = StockMoved {
        order_id,
        product_id: product.id,
        quantity,
        product_stock: product.stock,
    };
    let event = if decreased {
        Event::StockDecreased(moved)
    } else {
        Event::StockIncreased(moved)
    };
    vec![
        Envelope::new(Service::Products, event).caused_by(incoming),
        Envelope::new(Service::Products, product.changed()).caused_by(incoming),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{
        CancelReason, DeliveryCancelled, DeliveryCompleted, DeliveryState, OrderCancelled,
    };

    fn tv(stock: i64) -> Product {
        Product {
            id: 1,
            name: "TV".into(),
            price: 10000,
            stock,
            reserved: 0,
            delivered: 0,
        }
    }

    fn placed(quantity: i64) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id: 9,
                product_id: 1,
                product_name: Some("TV".into()),
                quantity,
                price: None,
                customer_id: "c".into(),
                customer_name: None,
                customer_addr: None,
            }),
        )
    }

    fn order_cancelled(initiator: Option<Service>) -> Envelope {
        let mut e = Envelope::new(
            Service::Orders,
            Event::OrderCancelled(OrderCancelled {
                order_id: 9,
                product_id: 1,
                quantity: 3,
                customer_id: "c".into(),
                state_message: "x".into(),
                reason: Some(CancelReason::Customer),
            }),
        );
        e.initiator = initiator;
        e
    }

    fn delivery_cancelled(initiator: Option<Service>) -> Envelope {
        let mut e = Envelope::new(
            Service::Delivery,
            Event::DeliveryCancelled(DeliveryCancelled {
                delivery_id: 1,
                order_id: 9,
                product_id: 1,
                quantity: 3,
                delivery_state: DeliveryState::Cancelled,
                state_message: "x".into(),
            }),
        );
        e.initiator = initiator;
        e
    }

    /// Order 9's reservation of `quantity`, with `stock` left on hand.
    fn reserved(quantity: i64, stock: i64) -> StockView {
        StockView {
            product: Some(Product {
                reserved: quantity,
                ..tv(stock)
            }),
            reservation: Some(StockReservation {
                order_id: 9,
                product_id: 1,
                quantity,
                state: ReservationState::Reserved,
            }),
        }
    }

    fn types(events: &[Envelope]) -> Vec<&'static str> {
        events.iter().map(|e| e.event_type()).collect()
    }

    #[test]
    fn enough_stock_is_reserved_and_announced() {
        let incoming = placed(3);
        let view = StockView {
            product: Some(tv(10)),
            reservation: None,
        };
        let (after, events) = react(view, &incoming);
        assert_eq!(after.product.unwrap().stock, 7);
        assert_eq!(after.reservation.unwrap().state, ReservationState::Reserved);
        assert_eq!(types(&events), ["StockDecreased", "ProductChanged"]);
        assert!(
            events
                .iter()
                .all(|e| e.causation_id == Some(incoming.event_id))
        );
        assert!(events.iter().all(|e| e.initiator.is_none()));
        assert_eq!(events[0].correlation_id.as_deref(), Some("9"));
    }

    #[test]
    fn exactly_the_stock_on_hand_can_be_reserved() {
        let (after, events) = react(
            StockView {
                product: Some(tv(3)),
                reservation: None,
            },
            &placed(3),
        );
        assert_eq!(after.product.unwrap().stock, 0);
        assert_eq!(types(&events), ["StockDecreased", "ProductChanged"]);
    }

    #[test]
    fn too_little_stock_is_refused_and_stock_untouched() {
        let view = StockView {
            product: Some(tv(90)),
            reservation: None,
        };
        let (after, events) = react(view, &placed(100));
        assert_eq!(after.product.unwrap().stock, 90);
        assert_eq!(after.reservation.unwrap().state, ReservationState::Rejected);
        assert_eq!(types(&events), ["ProductOutOfStock"]);
        assert!(events[0].initiated_by_service(Service::Products));
        let Event::ProductOutOfStock(e) = &events[0].event else {
            unreachable!()
        };
        assert_eq!(e.product_stock, Some(90));
    }

    #[test]
    fn an_unknown_product_is_out_of_stock() {
        let (after, events) = react(StockView::default(), &placed(1));
        assert_eq!(after.product, None);
        assert_eq!(types(&events), ["ProductOutOfStock"]);
        let Event::ProductOutOfStock(e) = &events[0].event else {
            unreachable!()
        };
        assert_eq!(e.product_stock, None);
        assert!(e.state_message.contains("does not exist"));
    }

    #[test]
    fn a_second_order_placed_for_a_decided_order_does_nothing() {
        let view = reserved(3, 7);
        let (after, events) = react(view.clone(), &placed(3));
        assert_eq!(after, view);
        assert!(events.is_empty());
    }

    #[test]
    fn order_cancelled_releases_the_reservation_whatever_the_stock() {
        // stock 0 after reserving everything: the original `stock - quantity > 0` check
        // would have skipped this restore.
        let incoming = order_cancelled(Some(Service::Orders));
        let (after, events) = react(reserved(3, 0), &incoming);
        assert_eq!(after.product.unwrap().stock, 3);
        assert_eq!(after.reservation.unwrap().state, ReservationState::Released);
        assert_eq!(types(&events), ["StockIncreased", "ProductChanged"]);
        assert!(events[0].initiated_by_service(Service::Orders));
    }

    #[test]
    fn delivery_cancelled_releases_the_reservation() {
        let (after, events) = react(reserved(3, 7), &delivery_cancelled(Some(Service::Delivery)));
        assert_eq!(after.product.unwrap().stock, 10);
        assert_eq!(types(&events), ["StockIncreased", "ProductChanged"]);
    }

    #[test]
    fn a_reservation_is_released_only_once() {
        let (after, _) = react(reserved(3, 7), &order_cancelled(Some(Service::Orders)));
        let (again, events) = react(after.clone(), &delivery_cancelled(Some(Service::Orders)));
        assert_eq!(again, after);
        assert!(events.is_empty());
    }

    #[test]
    fn compensations_of_a_chain_products_started_are_skipped() {
        let view = reserved(3, 7); // even if something were reserved
        for incoming in [
            order_cancelled(Some(Service::Products)),
            delivery_cancelled(Some(Service::Products)),
        ] {
            let (after, events) = react(view.clone(), &incoming);
            assert_eq!(after, view);
            assert!(events.is_empty());
        }
    }

    #[test]
    fn a_cancel_of_a_rejected_order_does_nothing() {
        let rejected = StockView {
            product: Some(tv(10)),
            reservation: Some(StockReservation {
                order_id: 9,
                product_id: 1,
                quantity: 100,
                state: ReservationState::Rejected,
            }),
        };
        let (after, events) = react(rejected.clone(), &order_cancelled(Some(Service::Orders)));
        assert_eq!(after, rejected);
        assert!(events.is_empty());
    }

    fn delivery_completed() -> Envelope {
        Envelope::new(
            Service::Delivery,
            Event::DeliveryCompleted(DeliveryCompleted {
                delivery_id: 1,
                order_id: 9,
                delivery_state: DeliveryState::Completed,
            }),
        )
    }

    #[test]
    fn a_cancel_before_order_placed_voids_the_order_and_the_late_placed_reserves_nothing() {
        // the relay-retry reordering: OrderCancelled, then OrderPlaced
        for cancel in [
            order_cancelled(Some(Service::Orders)),
            delivery_cancelled(Some(Service::Delivery)),
        ] {
            let view = StockView {
                product: Some(tv(10)),
                reservation: None,
            };
            let (voided, events) = react(view, &cancel);
            assert!(events.is_empty());
            assert_eq!(voided.product.as_ref().unwrap().stock, 10);
            assert_eq!(
                voided.reservation.as_ref().unwrap().state,
                ReservationState::Voided
            );
            let (after, events) = react(voided.clone(), &placed(3));
            assert_eq!(after, voided, "stock untouched");
            assert!(events.is_empty());
        }
    }

    #[test]
    fn a_delivered_reservation_is_settled_and_never_released() {
        let (delivered, events) = react(reserved(3, 7), &delivery_completed());
        assert!(events.is_empty());
        assert_eq!(
            delivered.reservation.as_ref().unwrap().state,
            ReservationState::Delivered
        );
        assert_eq!(delivered.product.as_ref().unwrap().stock, 7);
        for cancel in [
            order_cancelled(Some(Service::Orders)),
            delivery_cancelled(Some(Service::Delivery)),
        ] {
            let (after, events) = react(delivered.clone(), &cancel);
            assert_eq!(after, delivered, "a delivered order is never restocked");
            assert!(events.is_empty());
        }
        // and a DeliveryCompleted for a released reservation changes nothing
        let (released, _) = react(reserved(3, 7), &order_cancelled(Some(Service::Orders)));
        let (after, _) = react(released.clone(), &delivery_completed());
        assert_eq!(after, released);
    }

    #[test]
    fn a_cancel_with_a_reason_and_initiator_this_version_does_not_know_still_releases() {
        // A rolling upgrade: a newer orders (or a new service) sends a reason products does
        // not know. Decoded with fallbacks, it is handled, not parked with the units held.
        let json = order_cancelled(Some(Service::Orders))
            .to_json()
            .replace(r#""reason":"customer""#, r#""reason":"admin""#)
            .replace(r#""initiator":"orders""#, r#""initiator":"payments""#);
        let Ok(events::Decoded::Known(incoming)) = events::decode(json.as_bytes()) else {
            panic!("{json} is not a known event")
        };
        let (after, events) = react(reserved(3, 7), &incoming);
        assert_eq!(after.reservation.unwrap().state, ReservationState::Released);
        assert_eq!(types(&events), ["StockIncreased", "ProductChanged"]);
    }

    /// stock + reserved + delivered of a product, and its (stock, reserved, delivered).
    fn units(view: &StockView) -> (i64, (i64, i64, i64)) {
        let p = view.product.as_ref().expect("a product");
        (
            p.stock + p.reserved + p.delivered,
            (p.stock, p.reserved, p.delivered),
        )
    }

    /// Every path of an order's reservation keeps stock + reserved + delivered, and the
    /// counters say where the units are: reserve, then release or deliver (and anything
    /// after that), or a refusal.
    #[test]
    fn the_saga_moves_units_between_stock_reserved_and_delivered_and_never_makes_one() {
        let fresh = StockView {
            product: Some(tv(10)),
            reservation: None,
        };
        let (held, _) = react(fresh.clone(), &placed(3));
        assert_eq!(units(&held), (10, (7, 3, 0)));
        let (released, _) = react(held.clone(), &order_cancelled(Some(Service::Orders)));
        assert_eq!(units(&released), (10, (10, 0, 0)));
        let (delivered, _) = react(held, &delivery_completed());
        assert_eq!(units(&delivered), (10, (7, 0, 3)));
        for later in [
            order_cancelled(Some(Service::Orders)),
            delivery_cancelled(Some(Service::Delivery)),
            delivery_completed(),
            placed(3),
        ] {
            assert_eq!(units(&react(delivered.clone(), &later).0), (10, (7, 0, 3)));
            assert_eq!(units(&react(released.clone(), &later).0), (10, (10, 0, 0)));
        }
        let (refused, _) = react(fresh, &placed(11));
        assert_eq!(units(&refused), (10, (10, 0, 0)));
    }

    #[test]
    fn other_events_do_nothing() {
        let view = reserved(3, 7);
        let mut other = placed(1);
        other.event = tv(5).changed();
        let (after, events) = react(view.clone(), &other);
        assert_eq!(after, view);
        assert!(events.is_empty());
    }
}
