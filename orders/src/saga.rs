//! Orders' saga rules as pure functions: (the order, incoming event or customer action) →
//! (the order now, events to publish). No I/O here.

use events::{
    CancelReason, CancelRequestExpired, DeliveryState, Envelope, Event, OrderCancelRequested,
    OrderCancelled, OrderCompleted, OrderPlaced, Service,
};
use serde::Serialize;
use std::fmt;

/// Where an order stands; the names are the API's and the seed lab's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OrderState {
    /// Pending: waiting for stock and delivery.
    #[serde(rename = "OrderPlaced")]
    Placed,
    /// Stock reserved and delivery started.
    #[serde(rename = "OrderCompleted")]
    Completed,
    /// Cancelled by the customer or by a compensation; final.
    #[serde(rename = "OrderCancelled")]
    Cancelled,
}

impl OrderState {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Placed => "OrderPlaced",
            OrderState::Completed => "OrderCompleted",
            OrderState::Cancelled => "OrderCancelled",
        }
    }

    /// Parses the API name.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Placed, Self::Completed, Self::Cancelled]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order and what orders has learned about its saga; serialised as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// Order id.
    pub id: i64,
    /// What was ordered.
    pub product_id: i64,
    /// The product's name, as the catalog replica knew it.
    pub product_name: Option<String>,
    /// How many.
    pub quantity: i64,
    /// Total price, as the catalog replica knew it.
    pub price: Option<i64>,
    /// Who ordered.
    pub customer_id: String,
    /// The customer's name, if given.
    pub customer_name: Option<String>,
    /// Where to deliver, if given.
    pub customer_addr: Option<String>,
    /// Where it stands.
    pub state: OrderState,
    /// StockDecreased arrived.
    pub stock_reserved: bool,
    /// DeliveryStarted arrived with this delivery id.
    pub delivery_id: Option<i64>,
    /// The delivery's last known state.
    pub delivery_state: Option<DeliveryState>,
    /// The customer asked to cancel a confirmed order; delivery has not answered yet.
    pub cancel_requested: bool,
    /// Why it was cancelled, or why a cancel was refused.
    pub state_message: Option<String>,
}

/// A customer cancel that the order's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CancelRefused(pub String);

/// What a customer cancel does.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomerCancel {
    /// The order was still pending: nothing can have been delivered, so orders cancels it at
    /// once (OrderCancelled; products releases, delivery calls off).
    Cancelled(Order, Envelope),
    /// The order was confirmed: the goods may be leaving right now, and only delivery knows.
    /// Orders asks (OrderCancelRequested); delivery answers DeliveryCancelled (the order is
    /// then cancelled and restocked) or CancelRefused (it stays completed).
    Requested(Order, Envelope),
}

/// Rule 1: the event a newly stored order publishes.
pub fn placed(order: &Order) -> Envelope {
    Envelope::new(
        Service::Orders,
        Event::OrderPlaced(OrderPlaced {
            order_id: order.id,
            product_id: order.product_id,
            product_name: order.product_name.clone(),
            quantity: order.quantity,
            price: order.price,
            customer_id: order.customer_id.clone(),
            customer_name: order.customer_name.clone(),
            customer_addr: order.customer_addr.clone(),
        }),
    )
}

/// Applies one saga event to the order.
pub fn react(mut order: Order, incoming: &Envelope) -> (Order, Vec<Envelope>) {
    match &incoming.event {
        // Rule 4: complete once both confirmations are in, in either order; late forward
        // events never revive a cancelled order.
        Event::StockDecreased(_) => {
            order.stock_reserved = true;
            complete_if_confirmed(order, incoming)
        }
        Event::DeliveryStarted(d) => {
            order.delivery_id = Some(d.delivery_id);
            // A late copy never overwrites a final state.
            order.delivery_state.get_or_insert(d.delivery_state);
            complete_if_confirmed(order, incoming)
        }
        // Rule 5: products could not reserve; cancel, carrying products as the initiator.
        Event::ProductOutOfStock(e) if order.state == OrderState::Placed => {
            let message = e.state_message.clone();
            cancel(order, CancelReason::OutOfStock, message, incoming)
        }
        // Rule 8: a courier's cancel cancels the order; so does delivery's yes to a cancel
        // the customer requested, also once the request expired (rule 13): delivery decided,
        // and the order must follow it. Orders' chains reach a confirmed order only through a
        // request; other DeliveryCancelled only echo a cancel that happened.
        Event::DeliveryCancelled(d) => {
            order.delivery_state = Some(d.delivery_state);
            let courier = incoming.initiated_by_service(Service::Delivery);
            let granted = incoming.initiated_by_service(Service::Orders)
                && (order.cancel_requested || order.state == OrderState::Completed);
            if (courier || granted) && order.state != OrderState::Cancelled {
                let why = if courier {
                    CancelReason::Courier
                } else {
                    CancelReason::Customer
                };
                cancel(order, why, d.state_message.clone(), incoming)
            } else {
                (order, Vec::new())
            }
        }
        // Rule 10: delivery said no (the goods left): the order stays completed, saying why.
        // An order already cancelled (the courier's cancel crossed the request) keeps its
        // first terminal reason: the refusal only closes the request.
        Event::CancelRefused(r) => {
            order.cancel_requested = false;
            if order.state == OrderState::Cancelled {
                return (order, Vec::new());
            }
            if let Some(state) = r.delivery_state {
                order.delivery_state = Some(state);
            }
            order.state_message = Some(format!("cancel refused: {}", r.state_message));
            (order, Vec::new())
        }
        Event::DeliveryCompleted(d) => {
            order.delivery_state = Some(d.delivery_state);
            (order, Vec::new())
        }
        _ => (order, Vec::new()),
    }
}

/// Rule 9: the customer cancels (`PATCH /orders/{id}`), starting a chain initiated by orders.
///
/// A pending order is cancelled here: orders has not confirmed it, so delivery cannot have
/// completed it. A confirmed order is only *requested* to be cancelled: whether the goods have
/// left is delivery's to say, not a copy here that may be stale. Refused when already
/// cancelled, already requested or known delivered, so a repeated cancel never publishes
/// twice.
pub fn cancel_by_customer(mut order: Order) -> Result<CustomerCancel, CancelRefused> {
    let refuse = |why: &str| Err(CancelRefused(format!("order {} {why}", order.id)));
    if order.state == OrderState::Cancelled {
        return refuse("is already cancelled");
    }
    if order.cancel_requested {
        return refuse("already has a cancellation pending; the delivery service decides");
    }
    if order.delivery_state == Some(DeliveryState::Completed) {
        return refuse("was already delivered and cannot be cancelled");
    }
    if order.state == OrderState::Placed {
        let (order, event) = cancelled(
            order,
            CancelReason::Customer,
            "cancelled by the customer".into(),
        );
        return Ok(CustomerCancel::Cancelled(
            order,
            event.initiated_by(Service::Orders),
        ));
    }
    order.cancel_requested = true;
    order.state_message = Some(
        "cancellation requested: the order is cancelled and its stock restored unless it \
         was already delivered"
            .into(),
    );
    let event = Event::OrderCancelRequested(OrderCancelRequested {
        order_id: order.id,
        product_id: order.product_id,
        quantity: order.quantity,
        customer_id: order.customer_id.clone(),
        state_message: "cancel requested by the customer".into(),
    });
    let event = Envelope::new(Service::Orders, event).initiated_by(Service::Orders);
    Ok(CustomerCancel::Requested(order, event))
}

/// Rule 12: an order still pending after the saga timeout is cancelled by orders, as a
/// customer cancel of a pending order would be (initiator orders): products releases what it
/// reserved, delivery calls off what it started. A late StockDecreased or DeliveryStarted
/// cannot revive it (rule 4), and products, which sees the OrderCancelled after the
/// OrderPlaced on the same partition, releases whatever it reserved: stock is conserved.
pub fn time_out(order: Order, timeout_secs: u64) -> Option<(Order, Envelope)> {
    if order.state != OrderState::Placed {
        return None;
    }
    let reason = format!(
        "cancelled by orders: no confirmation from products and delivery within \
         {timeout_secs} s (SAGA_TIMEOUT_S)"
    );
    let (order, event) = cancelled(order, CancelReason::SagaTimeout, reason);
    Some((order, event.initiated_by(Service::Orders)))
}

/// Rule 13: a cancel request delivery has not answered within the saga timeout (delivery
/// down, or the request parked) is closed, saying so (CancelRequestExpired, for the order's
/// timeline and a rebuild): the order stays completed, the
/// customer may ask again, and `cancelRequested` never stays true for good. A late answer
/// still counts: a DeliveryCancelled cancels the order (rule 8), a CancelRefused says why
/// (rule 10).
pub fn expire_cancel_request(mut order: Order, timeout_secs: u64) -> Option<(Order, Envelope)> {
    if !order.cancel_requested || order.state != OrderState::Completed {
        return None;
    }
    let message = format!(
        "cancel request unanswered: delivery did not decide within {timeout_secs} s \
         (SAGA_TIMEOUT_S); the order stays completed unless delivery still cancels it, and \
         the customer may ask again"
    );
    order.cancel_requested = false;
    order.state_message = Some(message.clone());
    let event = Event::CancelRequestExpired(CancelRequestExpired {
        order_id: order.id,
        state_message: message,
    });
    let event = Envelope::new(Service::Orders, event).initiated_by(Service::Orders);
    Some((order, event))
}

/// The order as its OrderPlaced describes it, pending: what a rebuild starts from.
pub fn placed_order(e: &OrderPlaced) -> Order {
    Order {
        id: e.order_id,
        product_id: e.product_id,
        product_name: e.product_name.clone(),
        quantity: e.quantity,
        price: e.price,
        customer_id: e.customer_id.clone(),
        customer_name: e.customer_name.clone(),
        customer_addr: e.customer_addr.clone(),
        state: OrderState::Placed,
        stock_reserved: false,
        delivery_id: None,
        delivery_state: None,
        cancel_requested: false,
        state_message: None,
    }
}

/// Replays one of orders' own decisions, read back from the topic, onto the order (a rebuild
/// of the read model): what the rule that published it did to the order. Other events go
/// through [`react`], whose caused events are already on the topic.
pub fn replay_own(order: Order, own: &Envelope) -> Order {
    match &own.event {
        Event::OrderCompleted(_) if order.state == OrderState::Placed => Order {
            state: OrderState::Completed,
            ..order
        },
        Event::OrderCancelled(c) => Order {
            state: OrderState::Cancelled,
            cancel_requested: false,
            state_message: Some(c.state_message.clone()),
            ..order
        },
        Event::OrderCancelRequested(_) => match cancel_by_customer(order.clone()) {
            Ok(CustomerCancel::Requested(requested, _)) => requested,
            _ => order,
        },
        Event::CancelRequestExpired(e) if order.cancel_requested => Order {
            cancel_requested: false,
            state_message: Some(e.state_message.clone()),
            ..order
        },
        _ => order,
    }
}

fn complete_if_confirmed(mut order: Order, incoming: &Envelope) -> (Order, Vec<Envelope>) {
    if order.state != OrderState::Placed || !order.stock_reserved || order.delivery_id.is_none() {
        return (order, Vec::new());
    }
    order.state = OrderState::Completed;
    let event = Event::OrderCompleted(OrderCompleted {
        order_id: order.id,
        product_id: order.product_id,
        quantity: order.quantity,
        customer_id: order.customer_id.clone(),
    });
    (
        order,
        vec![Envelope::new(Service::Orders, event).caused_by(incoming)],
    )
}

fn cancel(
    order: Order,
    why: CancelReason,
    message: String,
    incoming: &Envelope,
) -> (Order, Vec<Envelope>) {
    let (order, event) = cancelled(order, why, message);
    (order, vec![event.caused_by(incoming)])
}

fn cancelled(mut order: Order, why: CancelReason, message: String) -> (Order, Envelope) {
    order.state = OrderState::Cancelled;
    order.cancel_requested = false;
    order.state_message = Some(message.clone());
    let event = Event::OrderCancelled(OrderCancelled {
        order_id: order.id,
        product_id: order.product_id,
        quantity: order.quantity,
        customer_id: order.customer_id.clone(),
        state_message: message,
        reason: Some(why),
    });
    (order, Envelope::new(Service::Orders, event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{
        CancelRefused as Refusal, DeliveryCancelled, DeliveryCompleted, DeliveryStarted,
        ProductOutOfStock, StockMoved,
    };

    fn order(state: OrderState) -> Order {
        Order {
            id: 5,
            product_id: 1,
            product_name: Some("TV".into()),
            quantity: 1,
            price: Some(10000),
            customer_id: "c".into(),
            customer_name: None,
            customer_addr: None,
            state,
            stock_reserved: false,
            delivery_id: None,
            delivery_state: None,
            cancel_requested: false,
            state_message: None,
        }
    }

    fn from(source: Service, event: Event, initiator: Option<Service>) -> Envelope {
        let mut e = Envelope::new(source, event);
        e.initiator = initiator;
        e
    }

    fn stock_decreased() -> Envelope {
        let moved = StockMoved {
            order_id: 5,
            product_id: 1,
            quantity: 1,
            product_stock: 9,
        };
        from(Service::Products, Event::StockDecreased(moved), None)
    }

    fn delivery_started() -> Envelope {
        let started = DeliveryStarted {
            delivery_id: 3,
            order_id: 5,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
            customer_name: None,
            delivery_address: None,
            delivery_state: DeliveryState::Started,
        };
        from(Service::Delivery, Event::DeliveryStarted(started), None)
    }

    fn out_of_stock() -> Envelope {
        let e = ProductOutOfStock {
            order_id: 5,
            product_id: 1,
            quantity: 100,
            product_stock: Some(90),
            state_message: "only 90 of TV in stock, 100 ordered".into(),
        };
        from(
            Service::Products,
            Event::ProductOutOfStock(e),
            Some(Service::Products),
        )
    }

    fn delivery_cancelled(initiator: Service) -> Envelope {
        let e = DeliveryCancelled {
            delivery_id: 3,
            order_id: 5,
            product_id: 1,
            quantity: 1,
            delivery_state: DeliveryState::Cancelled,
            state_message: "cancelled by the courier".into(),
        };
        from(
            Service::Delivery,
            Event::DeliveryCancelled(e),
            Some(initiator),
        )
    }

    fn types(events: &[Envelope]) -> Vec<&'static str> {
        events.iter().map(|e| e.event_type()).collect()
    }

    #[test]
    fn a_new_order_publishes_order_placed() {
        let e = placed(&order(OrderState::Placed));
        assert_eq!(e.event_type(), "OrderPlaced");
        assert_eq!((e.causation_id, e.initiator), (None, None));
        assert_eq!(e.key(), "5");
    }

    #[test]
    fn completes_after_stock_then_delivery() {
        let (o, events) = react(order(OrderState::Placed), &stock_decreased());
        assert_eq!(o.state, OrderState::Placed);
        assert!(events.is_empty());
        let incoming = delivery_started();
        let (o, events) = react(o, &incoming);
        assert_eq!(o.state, OrderState::Completed);
        assert_eq!(types(&events), ["OrderCompleted"]);
        assert_eq!(events[0].causation_id, Some(incoming.event_id));
    }

    #[test]
    fn completes_after_delivery_then_stock() {
        let (o, events) = react(order(OrderState::Placed), &delivery_started());
        assert!(events.is_empty());
        assert_eq!(o.delivery_id, Some(3));
        let (o, events) = react(o, &stock_decreased());
        assert_eq!(o.state, OrderState::Completed);
        assert_eq!(types(&events), ["OrderCompleted"]);
    }

    #[test]
    fn completes_only_once() {
        let (o, _) = react(order(OrderState::Placed), &delivery_started());
        let (o, _) = react(o, &stock_decreased());
        let (o2, events) = react(o.clone(), &stock_decreased());
        assert_eq!(o2, o);
        assert!(events.is_empty());
    }

    #[test]
    fn late_forward_events_never_complete_a_cancelled_order() {
        let (o, _) = react(order(OrderState::Cancelled), &stock_decreased());
        let (o, events) = react(o, &delivery_started());
        assert_eq!(o.state, OrderState::Cancelled);
        assert!(events.is_empty());
    }

    #[test]
    fn out_of_stock_cancels_with_products_as_initiator() {
        let incoming = out_of_stock();
        let (o, events) = react(order(OrderState::Placed), &incoming);
        assert_eq!(o.state, OrderState::Cancelled);
        assert!(o.state_message.unwrap().contains("only 90"));
        assert_eq!(types(&events), ["OrderCancelled"]);
        assert!(events[0].initiated_by_service(Service::Products));
        assert_eq!(events[0].causation_id, Some(incoming.event_id));
    }

    #[test]
    fn out_of_stock_for_a_cancelled_order_does_nothing() {
        let (o, events) = react(order(OrderState::Cancelled), &out_of_stock());
        assert_eq!(o, order(OrderState::Cancelled));
        assert!(events.is_empty());
    }

    #[test]
    fn a_courier_cancel_cancels_the_order() {
        for state in [OrderState::Placed, OrderState::Completed] {
            let (o, events) = react(order(state), &delivery_cancelled(Service::Delivery));
            assert_eq!(o.state, OrderState::Cancelled);
            assert_eq!(types(&events), ["OrderCancelled"]);
            assert!(events[0].initiated_by_service(Service::Delivery));
        }
    }

    #[test]
    fn delivery_cancelled_of_other_chains_does_not_cancel_again() {
        for initiator in [Service::Orders, Service::Products] {
            let (o, events) = react(order(OrderState::Cancelled), &delivery_cancelled(initiator));
            assert_eq!(o.state, OrderState::Cancelled);
            assert_eq!(o.delivery_state, Some(DeliveryState::Cancelled));
            assert!(events.is_empty());
        }
        // and a courier cancel of an order already cancelled publishes nothing either
        let (_, events) = react(
            order(OrderState::Cancelled),
            &delivery_cancelled(Service::Delivery),
        );
        assert!(events.is_empty());
    }

    #[test]
    fn delivery_completed_is_recorded() {
        let e = DeliveryCompleted {
            delivery_id: 3,
            order_id: 5,
            delivery_state: DeliveryState::Completed,
        };
        let (o, events) = react(
            order(OrderState::Completed),
            &from(Service::Delivery, Event::DeliveryCompleted(e), None),
        );
        assert_eq!(o.delivery_state, Some(DeliveryState::Completed));
        assert!(events.is_empty());
    }

    #[test]
    fn own_and_unrelated_events_do_nothing() {
        let own = placed(&order(OrderState::Placed));
        let (o, events) = react(order(OrderState::Placed), &own);
        assert_eq!(o, order(OrderState::Placed));
        assert!(events.is_empty());
    }

    #[test]
    fn the_customer_cancels_a_pending_order_at_once() {
        let Ok(CustomerCancel::Cancelled(o, event)) = cancel_by_customer(order(OrderState::Placed))
        else {
            panic!("a pending order is cancelled at once")
        };
        assert_eq!(o.state, OrderState::Cancelled);
        assert_eq!(event.event_type(), "OrderCancelled");
        assert!(event.initiated_by_service(Service::Orders));
        assert_eq!(event.causation_id, None);
    }

    fn requested() -> (Order, Envelope) {
        let mut o = order(OrderState::Completed);
        o.delivery_state = Some(DeliveryState::Started);
        match cancel_by_customer(o) {
            Ok(CustomerCancel::Requested(o, event)) => (o, event),
            other => panic!("a confirmed order is only requested to cancel: {other:?}"),
        }
    }

    fn delivery_cancelled_by(cause: &Envelope) -> Envelope {
        let e = DeliveryCancelled {
            delivery_id: 3,
            order_id: 5,
            product_id: 1,
            quantity: 1,
            delivery_state: DeliveryState::Cancelled,
            state_message: "cancel requested by the customer".into(),
        };
        Envelope::new(Service::Delivery, Event::DeliveryCancelled(e)).caused_by(cause)
    }

    fn cancel_refused_by(cause: &Envelope) -> Envelope {
        let e = Refusal {
            order_id: 5,
            delivery_id: Some(3),
            delivery_state: Some(DeliveryState::Completed),
            state_message: "delivery 3 was already completed".into(),
        };
        Envelope::new(Service::Delivery, Event::CancelRefused(e)).caused_by(cause)
    }

    #[test]
    fn a_confirmed_order_is_only_requested_to_cancel_and_delivery_decides() {
        let (o, request) = requested();
        assert_eq!(
            o.state,
            OrderState::Completed,
            "stays completed until delivery says"
        );
        assert!(o.cancel_requested);
        assert_eq!(request.event_type(), "OrderCancelRequested");
        assert!(request.initiated_by_service(Service::Orders));
        let err = cancel_by_customer(o.clone()).unwrap_err();
        assert!(err.0.contains("pending"), "{err}");

        // delivery said yes: cancelled now, with orders as the initiator
        let yes = delivery_cancelled_by(&request);
        let (cancelled, events) = react(o.clone(), &yes);
        assert_eq!(cancelled.state, OrderState::Cancelled);
        assert!(!cancelled.cancel_requested);
        assert_eq!(types(&events), ["OrderCancelled"]);
        assert!(events[0].initiated_by_service(Service::Orders));
        assert_eq!(events[0].causation_id, Some(yes.event_id));
    }

    #[test]
    fn a_refused_cancel_leaves_the_order_completed_saying_why() {
        let (o, request) = requested();
        let (after, events) = react(o, &cancel_refused_by(&request));
        assert_eq!(after.state, OrderState::Completed);
        assert!(!after.cancel_requested);
        assert_eq!(after.delivery_state, Some(DeliveryState::Completed));
        assert!(after.state_message.unwrap().contains("already completed"));
        assert!(events.is_empty());
    }

    #[test]
    fn delivered_first_then_cancel_request_is_refused_here() {
        // DeliveryCompleted arrived before the customer asked: refused without asking.
        let mut o = order(OrderState::Completed);
        let e = DeliveryCompleted {
            delivery_id: 3,
            order_id: 5,
            delivery_state: DeliveryState::Completed,
        };
        (o, _) = react(
            o,
            &from(Service::Delivery, Event::DeliveryCompleted(e), None),
        );
        let err = cancel_by_customer(o).unwrap_err();
        assert!(err.0.contains("delivered"), "{err}");
    }

    #[test]
    fn a_cancel_request_then_delivery_completed_then_refusal_never_cancels() {
        // the race of the issue: the courier completes while the request is in flight
        let (o, request) = requested();
        let e = DeliveryCompleted {
            delivery_id: 3,
            order_id: 5,
            delivery_state: DeliveryState::Completed,
        };
        let (o, events) = react(
            o,
            &from(Service::Delivery, Event::DeliveryCompleted(e), None),
        );
        assert!(events.is_empty());
        let (o, events) = react(o, &cancel_refused_by(&request));
        assert_eq!(o.state, OrderState::Completed);
        assert!(events.is_empty());
    }

    #[test]
    fn an_echo_of_an_orders_chain_does_not_cancel_an_order_that_asked_nothing() {
        let request = placed(&order(OrderState::Completed));
        let (o, events) = react(
            order(OrderState::Completed),
            &delivery_cancelled_by(&request),
        );
        assert_eq!(o.state, OrderState::Completed);
        assert!(events.is_empty());
    }

    #[test]
    fn a_late_delivery_started_does_not_overwrite_a_final_delivery_state() {
        let mut o = order(OrderState::Cancelled);
        o.delivery_state = Some(DeliveryState::Cancelled);
        let (o, _) = react(o, &delivery_started());
        assert_eq!(o.delivery_state, Some(DeliveryState::Cancelled));
    }

    #[test]
    fn a_pending_order_times_out_with_orders_as_initiator() {
        let (o, event) = time_out(order(OrderState::Placed), 30).unwrap();
        assert_eq!(o.state, OrderState::Cancelled);
        assert!(o.state_message.unwrap().contains("within 30 s"));
        assert_eq!(event.event_type(), "OrderCancelled");
        assert!(event.initiated_by_service(Service::Orders));
        for state in [OrderState::Completed, OrderState::Cancelled] {
            assert!(time_out(order(state), 30).is_none(), "{state}");
        }
    }

    #[test]
    fn late_confirmations_never_revive_a_timed_out_order() {
        // stock confirmed before the timeout, delivery after it
        let (o, _) = react(order(OrderState::Placed), &stock_decreased());
        let (o, _) = time_out(o, 30).unwrap();
        let (o, events) = react(o, &delivery_started());
        assert_eq!(o.state, OrderState::Cancelled);
        assert!(events.is_empty());
        // both after it
        let (o, _) = time_out(order(OrderState::Placed), 30).unwrap();
        let (o, _) = react(o, &delivery_started());
        let (o, events) = react(o, &stock_decreased());
        assert_eq!(o.state, OrderState::Cancelled);
        assert!(events.is_empty());
        // a completed order is never timed out, whatever arrives later
        let (o, _) = react(order(OrderState::Placed), &stock_decreased());
        let (o, _) = react(o, &delivery_started());
        assert!(time_out(o, 30).is_none());
    }

    #[test]
    fn every_cancel_says_why_in_its_type() {
        let reason = |events: &[Envelope]| match events {
            [e] => match &e.event {
                Event::OrderCancelled(c) => c.reason,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let placed = || order(OrderState::Placed);
        let (_, events) = react(placed(), &out_of_stock());
        assert_eq!(reason(&events), Some(CancelReason::OutOfStock));
        let (_, events) = react(placed(), &delivery_cancelled(Service::Delivery));
        assert_eq!(reason(&events), Some(CancelReason::Courier));
        let (o, request) = requested();
        let (_, events) = react(o, &delivery_cancelled_by(&request));
        assert_eq!(reason(&events), Some(CancelReason::Customer));
        let Ok(CustomerCancel::Cancelled(_, event)) = cancel_by_customer(placed()) else {
            panic!()
        };
        assert_eq!(reason(&[event]), Some(CancelReason::Customer));
        let (_, event) = time_out(placed(), 30).unwrap();
        assert_eq!(reason(&[event]), Some(CancelReason::SagaTimeout));
    }

    #[test]
    fn a_second_cancel_is_refused() {
        let Ok(CustomerCancel::Cancelled(o, _)) = cancel_by_customer(order(OrderState::Placed))
        else {
            panic!()
        };
        let err = cancel_by_customer(o).unwrap_err();
        assert!(err.0.contains("already cancelled"));
    }

    /// The courier cancelled while the customer's request was on its way: delivery refuses
    /// the request ("already DeliveryCancelled"), and the courier's reason must stay.
    #[test]
    fn a_refusal_never_overwrites_the_reason_of_an_order_the_courier_cancelled() {
        let courier_message = |o: &Order| o.state_message.clone().unwrap_or_default();
        let refusal = |request: &Envelope| {
            let e = Refusal {
                order_id: 5,
                delivery_id: Some(3),
                delivery_state: Some(DeliveryState::Cancelled),
                state_message: "delivery 3 is already DeliveryCancelled".into(),
            };
            Envelope::new(Service::Delivery, Event::CancelRefused(e)).caused_by(request)
        };
        // the courier's cancel first, then the refusal (the order on the topic)
        let (o, request) = requested();
        let (cancelled, _) = react(o, &delivery_cancelled(Service::Delivery));
        let (after, events) = react(cancelled.clone(), &refusal(&request));
        assert_eq!(after.state, OrderState::Cancelled);
        assert!(!after.cancel_requested);
        assert_eq!(courier_message(&after), "cancelled by the courier");
        assert_eq!(after, cancelled, "nothing else changes either");
        assert!(events.is_empty());
        // the refusal first, then the courier's cancel
        let (o, request) = requested();
        let (refused, _) = react(o, &refusal(&request));
        let (after, events) = react(refused, &delivery_cancelled(Service::Delivery));
        assert_eq!(after.state, OrderState::Cancelled);
        assert_eq!(courier_message(&after), "cancelled by the courier");
        assert_eq!(types(&events), ["OrderCancelled"]);
    }

    /// Delivery parked (or never read) the request: past the timeout the request closes with
    /// a stated reason, and the customer may ask again; nothing else is touched.
    #[test]
    fn an_unanswered_cancel_request_expires_saying_so() {
        let (o, _) = requested();
        let (expired, event) =
            expire_cancel_request(o.clone(), 30).expect("an open request expires");
        assert_eq!(event.event_type(), "CancelRequestExpired");
        assert!(event.initiated_by_service(Service::Orders));
        assert_eq!(
            replay_own(o.clone(), &event),
            expired,
            "a rebuild replays it"
        );
        assert!(!expired.cancel_requested);
        assert_eq!(expired.state, OrderState::Completed);
        assert!(
            expired
                .state_message
                .as_deref()
                .unwrap()
                .contains("unanswered"),
            "{expired:?}"
        );
        assert_eq!(
            Order {
                cancel_requested: true,
                state_message: o.state_message.clone(),
                ..expired.clone()
            },
            o,
            "nothing else changes"
        );
        assert!(matches!(
            cancel_by_customer(expired),
            Ok(CustomerCancel::Requested(..))
        ));
        // nothing to expire: no request, or the order is no longer completed
        assert!(expire_cancel_request(order(OrderState::Completed), 30).is_none());
        assert!(expire_cancel_request(order(OrderState::Placed), 30).is_none());
        assert!(expire_cancel_request(order(OrderState::Cancelled), 30).is_none());
    }

    /// The request expired, then delivery's answer arrives (it was parked and redriven, or
    /// delivery was down): a yes still cancels the order, a no still says why.
    #[test]
    fn a_late_answer_to_an_expired_request_still_counts() {
        let (o, request) = requested();
        let (expired, _) = expire_cancel_request(o, 30).unwrap();
        let (after, events) = react(expired.clone(), &delivery_cancelled_by(&request));
        assert_eq!(after.state, OrderState::Cancelled);
        assert_eq!(types(&events), ["OrderCancelled"]);
        let (after, events) = react(expired, &cancel_refused_by(&request));
        assert_eq!(after.state, OrderState::Completed);
        assert!(after.state_message.unwrap().starts_with("cancel refused"));
        assert!(events.is_empty());
    }

    /// A rebuild replays orders' own decisions to the order each made: the same order as the
    /// rules left it, for each kind of decision.
    #[test]
    fn replaying_own_decisions_gives_the_order_the_rules_made() {
        let placed_event = placed(&order(OrderState::Placed));
        let Event::OrderPlaced(p) = &placed_event.event else {
            panic!()
        };
        assert_eq!(placed_order(p), order(OrderState::Placed));
        let (completed, events) = react(order(OrderState::Placed), &stock_decreased());
        let (completed, _) = react(completed, &delivery_started());
        assert!(events.is_empty());
        // a customer's request, then delivery's yes and orders' cancel
        let Ok(CustomerCancel::Requested(requested, request)) =
            cancel_by_customer(completed.clone())
        else {
            panic!()
        };
        assert_eq!(replay_own(completed.clone(), &request), requested);
        let (cancelled, caused) = react(requested.clone(), &delivery_cancelled_by(&request));
        assert_eq!(replay_own(cancelled.clone(), &caused[0]), cancelled);
        // a timeout and a customer's cancel of a pending order
        let (timed_out, event) = time_out(order(OrderState::Placed), 30).unwrap();
        assert_eq!(replay_own(order(OrderState::Placed), &event), timed_out);
        let Ok(CustomerCancel::Cancelled(cancelled, event)) =
            cancel_by_customer(order(OrderState::Placed))
        else {
            panic!()
        };
        assert_eq!(replay_own(order(OrderState::Placed), &event), cancelled);
    }

    #[test]
    fn a_delivered_order_cannot_be_cancelled() {
        let mut o = order(OrderState::Completed);
        o.delivery_state = Some(DeliveryState::Completed);
        let err = cancel_by_customer(o).unwrap_err();
        assert!(err.0.contains("delivered"));
    }
}
