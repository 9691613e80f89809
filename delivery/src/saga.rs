//! Delivery's saga rules as pure functions: (the order's delivery, incoming event or courier
//! action) → (the delivery now, events to publish). No I/O here.

use events::{
    CancelRefused, DeliveryCancelled, DeliveryCompleted, DeliveryStarted, Envelope, Event,
    OrderPlaced, Service,
};
use serde::Serialize;

pub use events::DeliveryState;

/// One order's delivery; serialised as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Delivery id.
    pub id: i64,
    /// The order delivered.
    pub order_id: i64,
    /// What is delivered.
    pub product_id: i64,
    /// How many.
    pub quantity: i64,
    /// To whom.
    pub customer_id: String,
    /// The customer's name, if given.
    pub customer_name: Option<String>,
    /// Where to, if given.
    pub delivery_address: Option<String>,
    /// Where it stands.
    #[serde(rename = "deliveryState")]
    pub state: DeliveryState,
    /// True once OrderCompleted arrived: only a confirmed order may be handed over.
    pub order_confirmed: bool,
    /// Why it was cancelled.
    pub state_message: Option<String>,
}

/// What delivery knows about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderDelivery {
    /// Nothing yet.
    Unknown,
    /// The order was cancelled before its OrderPlaced arrived here (a relay retry can reorder
    /// one order's events): a late OrderPlaced starts nothing.
    Voided,
    /// Its delivery.
    Known(Delivery),
}

/// A courier action that the delivery's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IllegalTransition(pub String);

/// Whether [`react`] starts a new delivery for `incoming` (and so uses its `next_id`): an
/// OrderPlaced for an order delivery knows nothing of. The shell's one read draws the next
/// id under the same condition ([`crate::store::by_order_with_next_id`]), not for every event.
pub fn starts_a_delivery(current: &OrderDelivery, incoming: &Envelope) -> bool {
    matches!(
        (&incoming.event, current),
        (Event::OrderPlaced(_), OrderDelivery::Unknown)
    )
}

/// Applies one saga event to the order's delivery. `next_id` is the id a new delivery gets.
pub fn react(
    current: OrderDelivery,
    incoming: &Envelope,
    next_id: i64,
) -> (OrderDelivery, Vec<Envelope>) {
    use OrderDelivery::{Known, Unknown, Voided};
    match (&incoming.event, current) {
        // Rule 3: start a delivery for a new order, once; never for a voided one.
        (Event::OrderPlaced(order), Unknown) => {
            let delivery = start(order, next_id);
            let event = Envelope::new(Service::Delivery, started(&delivery)).caused_by(incoming);
            (Known(delivery), vec![event])
        }
        (Event::OrderCompleted(_), Known(mut delivery)) => {
            delivery.order_confirmed = true;
            (Known(delivery), Vec::new())
        }
        // Rule 6: cancel on OrderCancelled, unless delivery started the chain itself; a
        // delivery already completed or cancelled stays as it is. Before any OrderPlaced, the
        // order is voided here.
        (Event::OrderCancelled(cancel), Known(delivery))
            if delivery.state == DeliveryState::Started
                && !incoming.initiated_by_service(Service::Delivery) =>
        {
            let (delivery, event) = cancel_delivery(delivery, cancel.state_message.clone());
            (Known(delivery), vec![event.caused_by(incoming)])
        }
        (Event::OrderCancelled(_), Unknown) => (Voided, Vec::new()),
        // Rule 10: the customer asks to cancel a confirmed order. Delivery knows whether the
        // goods left: if not, the delivery is called off and the chain goes on; if so (or
        // there is nothing to call off), it refuses and the order stays as it is.
        (Event::OrderCancelRequested(request), Known(delivery))
            if delivery.state == DeliveryState::Started =>
        {
            let (delivery, event) = cancel_delivery(delivery, request.state_message.clone());
            (Known(delivery), vec![event.caused_by(incoming)])
        }
        (Event::OrderCancelRequested(request), current) => {
            let (delivery_id, state, why) = match &current {
                Known(d) if d.state == DeliveryState::Completed => (
                    Some(d.id),
                    Some(d.state),
                    format!("delivery {} was already completed", d.id),
                ),
                Known(d) => (
                    Some(d.id),
                    Some(d.state),
                    format!("delivery {} is already {}", d.id, d.state),
                ),
                Unknown | Voided => (None, None, "there is no delivery to call off".to_owned()),
            };
            let refused = Event::CancelRefused(CancelRefused {
                order_id: request.order_id,
                delivery_id,
                delivery_state: state,
                state_message: why,
            });
            let event = Envelope::new(Service::Delivery, refused).caused_by(incoming);
            (current, vec![event])
        }
        (_, current) => (current, Vec::new()),
    }
}

/// A courier's update (`PATCH /deliveries/{id}`): complete a confirmed delivery, or cancel a
/// started one, which starts a compensation chain initiated by delivery.
pub fn courier_update(
    delivery: Delivery,
    target: DeliveryState,
) -> Result<(Delivery, Envelope), IllegalTransition> {
    if delivery.state != DeliveryState::Started {
        return Err(IllegalTransition(format!(
            "delivery {} is already {}",
            delivery.id, delivery.state
        )));
    }
    match target {
        DeliveryState::Completed if !delivery.order_confirmed => Err(IllegalTransition(format!(
            "order {} is not confirmed yet (no OrderCompleted), so delivery {} cannot be completed",
            delivery.order_id, delivery.id
        ))),
        DeliveryState::Completed => {
            let mut delivery = delivery;
            delivery.state = DeliveryState::Completed;
            let event = Event::DeliveryCompleted(DeliveryCompleted {
                delivery_id: delivery.id,
                order_id: delivery.order_id,
                delivery_state: delivery.state,
            });
            Ok((delivery, Envelope::new(Service::Delivery, event)))
        }
        DeliveryState::Cancelled => {
            let (delivery, event) = cancel_delivery(delivery, "cancelled by the courier".into());
            Ok((delivery, event.initiated_by(Service::Delivery)))
        }
        DeliveryState::Started => Err(IllegalTransition(format!(
            "delivery {} is already started",
            delivery.id
        ))),
    }
}

/// A rebuild's rule ([`crate::rebuild`]): the order's delivery after `event` read back from
/// the topic. Delivery's own DeliveryStarted (with its id), DeliveryCompleted and
/// DeliveryCancelled are what it did, taken as facts; the other services' events go through
/// [`react`] and count only where the rule publishes nothing — OrderCompleted confirming the
/// order, an OrderCancelled before any delivery voiding it — since every decision that
/// published something (a start, a cancel, a refusal) is on the topic itself.
pub fn replay(current: OrderDelivery, event: &Envelope) -> OrderDelivery {
    use OrderDelivery::Known;
    match (&event.event, event.source, current) {
        (Event::DeliveryStarted(s), Service::Delivery, current) => match current {
            Known(d) => Known(d),
            _ => Known(Delivery {
                id: s.delivery_id,
                order_id: s.order_id,
                product_id: s.product_id,
                quantity: s.quantity,
                customer_id: s.customer_id.clone(),
                customer_name: s.customer_name.clone(),
                delivery_address: s.delivery_address.clone(),
                state: DeliveryState::Started,
                order_confirmed: false,
                state_message: None,
            }),
        },
        (Event::DeliveryCompleted(_), Service::Delivery, Known(mut d)) => {
            d.state = DeliveryState::Completed;
            Known(d)
        }
        (Event::DeliveryCancelled(c), Service::Delivery, Known(mut d)) => {
            d.state = DeliveryState::Cancelled;
            d.state_message = Some(c.state_message.clone());
            Known(d)
        }
        (_, Service::Delivery, current) => current,
        (_, _, current) => {
            let (after, caused) = react(current.clone(), event, 0);
            if caused.is_empty() { after } else { current }
        }
    }
}

fn start(order: &OrderPlaced, id: i64) -> Delivery {
    Delivery {
        id,
        order_id: order.order_id,
        product_id: order.product_id,
        quantity: order.quantity,
        customer_id: order.customer_id.clone(),
        customer_name: order.customer_name.clone(),
        delivery_address: order.customer_addr.clone(),
        state: DeliveryState::Started,
        order_confirmed: false,
        state_message: None,
    }
}

fn started(d: &Delivery) -> Event {
    Event::DeliveryStarted(DeliveryStarted {
        delivery_id: d.id,
        order_id: d.order_id,
        product_id: d.product_id,
        quantity: d.quantity,
        customer_id: d.customer_id.clone(),
        customer_name: d.customer_name.clone(),
        delivery_address: d.delivery_address.clone(),
        delivery_state: d.state,
    })
}

fn cancel_delivery(mut delivery: Delivery, reason: String) -> (Delivery, Envelope) {
    delivery.state = DeliveryState::Cancelled;
    delivery.state_message = Some(reason.clone());
    let event = Event::DeliveryCancelled(DeliveryCancelled {
        delivery_id: delivery.id,
        order_id: delivery.order_id,
        product_id: delivery.product_id,
        quantity: delivery.quantity,
        delivery_state: delivery.state,
        state_message: reason,
    });
    (delivery, Envelope::new(Service::Delivery, event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderDelivery::{Known, Unknown, Voided};
    use events::{CancelReason, OrderCancelRequested, OrderCancelled, OrderCompleted};

    fn placed() -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderPlaced(OrderPlaced {
                order_id: 4,
                product_id: 1,
                product_name: Some("TV".into()),
                quantity: 1,
                price: Some(10000),
                customer_id: "c".into(),
                customer_name: Some("Kim".into()),
                customer_addr: Some("Seoul".into()),
            }),
        )
    }

    fn cancelled(initiator: Service) -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelled(OrderCancelled {
                order_id: 4,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                state_message: "out of stock".into(),
                reason: Some(CancelReason::OutOfStock),
            }),
        )
        .initiated_by(initiator)
    }

    fn completed() -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCompleted(OrderCompleted {
                order_id: 4,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
            }),
        )
    }

    fn delivery(state: DeliveryState, order_confirmed: bool) -> Delivery {
        let (Known(mut d), _) = react(Unknown, &placed(), 12) else {
            unreachable!()
        };
        d.state = state;
        d.order_confirmed = order_confirmed;
        d
    }

    /// The shell reads a new id only when [`starts_a_delivery`] says so: whenever a rule
    /// creates a delivery, it said so.
    #[test]
    fn a_new_delivery_id_is_used_exactly_when_starts_a_delivery_says_so() {
        let states = [
            Unknown,
            Voided,
            Known(delivery(DeliveryState::Started, false)),
            Known(delivery(DeliveryState::Completed, true)),
        ];
        for state in states {
            for event in [placed(), completed(), cancelled(Service::Orders)] {
                let (after, _) = react(state.clone(), &event, 999);
                let uses_it = matches!(&after, Known(d) if d.id == 999);
                assert_eq!(
                    starts_a_delivery(&state, &event),
                    uses_it,
                    "{state:?} {}",
                    event.event_type()
                );
            }
        }
    }

    #[test]
    fn order_placed_starts_a_delivery() {
        let incoming = placed();
        let (after, events) = react(Unknown, &incoming, 12);
        let Known(d) = after else { panic!() };
        assert_eq!((d.id, d.order_id, d.state), (12, 4, DeliveryState::Started));
        assert_eq!(d.delivery_address.as_deref(), Some("Seoul"));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type(), "DeliveryStarted");
        assert_eq!(events[0].causation_id, Some(incoming.event_id));
        assert_eq!(events[0].correlation_id.as_deref(), Some("4"));
    }

    #[test]
    fn order_placed_again_does_not_start_a_second_delivery() {
        let d = delivery(DeliveryState::Started, false);
        let (after, events) = react(Known(d.clone()), &placed(), 13);
        assert_eq!(after, Known(d));
        assert!(events.is_empty());
    }

    /// One event of every type of the contract, for order 4.
    fn every_event() -> Vec<Envelope> {
        use events::{DeliveryCompleted, ProductChanged, ProductOutOfStock, StockMoved};
        let moved = StockMoved {
            order_id: 4,
            product_id: 1,
            quantity: 1,
            product_stock: 8,
        };
        let by = |source, event| Envelope::new(source, event);
        let all = vec![
            placed(),
            completed(),
            cancelled(Service::Orders),
            cancelled(Service::Products),
            cancelled(Service::Delivery),
            by(
                Service::Orders,
                Event::OrderCancelRequested(OrderCancelRequested {
                    order_id: 4,
                    product_id: 1,
                    quantity: 1,
                    customer_id: "c".into(),
                    state_message: "asked".into(),
                }),
            ),
            by(
                Service::Products,
                Event::ProductChanged(ProductChanged {
                    product_id: 1,
                    product_name: "TV".into(),
                    product_price: 10000,
                    product_stock: 8,
                }),
            ),
            by(Service::Products, Event::StockDecreased(moved.clone())),
            by(Service::Products, Event::StockIncreased(moved)),
            by(
                Service::Products,
                Event::ProductOutOfStock(ProductOutOfStock {
                    order_id: 4,
                    product_id: 1,
                    quantity: 100,
                    product_stock: Some(10),
                    state_message: "short".into(),
                }),
            ),
            by(
                Service::Delivery,
                Event::DeliveryStarted(DeliveryStarted {
                    delivery_id: 12,
                    order_id: 4,
                    product_id: 1,
                    quantity: 1,
                    customer_id: "c".into(),
                    customer_name: None,
                    delivery_address: None,
                    delivery_state: DeliveryState::Started,
                }),
            ),
            // Its own events read back (another instance's, or a replay).
            by(
                Service::Delivery,
                Event::DeliveryCompleted(DeliveryCompleted {
                    delivery_id: 12,
                    order_id: 4,
                    delivery_state: DeliveryState::Completed,
                }),
            ),
            by(
                Service::Delivery,
                Event::DeliveryCancelled(DeliveryCancelled {
                    delivery_id: 12,
                    order_id: 4,
                    product_id: 1,
                    quantity: 1,
                    delivery_state: DeliveryState::Cancelled,
                    state_message: "courier".into(),
                }),
            ),
            by(
                Service::Delivery,
                Event::CancelRefused(CancelRefused {
                    order_id: 4,
                    delivery_id: Some(12),
                    delivery_state: Some(DeliveryState::Completed),
                    state_message: "delivered".into(),
                }),
            ),
        ];
        let note = events::DeadLetterNote {
            order_id: 4,
            service: Service::Products,
            dead_letter_id: 1,
            parked_event_type: "DeliveryCompleted".into(),
            parked_event_id: placed().event_id,
            state_message: "parked".into(),
            redrive_event_id: None,
        };
        let mut all = all;
        all.extend([
            by(
                Service::Orders,
                Event::CancelRequestExpired(events::CancelRequestExpired {
                    order_id: 4,
                    state_message: "unanswered".into(),
                }),
            ),
            by(Service::Products, Event::EventParked(note.clone())),
            by(Service::Products, Event::DeadLetterRedriven(note.clone())),
            by(Service::Products, Event::DeadLetterDiscarded(note)),
        ]);
        let types: std::collections::BTreeSet<&str> =
            all.iter().map(Envelope::event_type).collect();
        assert_eq!(
            types,
            Event::TYPES.into_iter().collect(),
            "one of every type"
        );
        all
    }

    /// Only the courier completes a delivery: no event, in any state the order's delivery
    /// can be in, completes it or publishes DeliveryCompleted.
    #[test]
    fn delivery_is_never_completed_on_its_own() {
        let mut states = vec![Unknown, Voided];
        for state in [
            DeliveryState::Started,
            DeliveryState::Completed,
            DeliveryState::Cancelled,
        ] {
            for confirmed in [false, true] {
                states.push(Known(delivery(state, confirmed)));
            }
        }
        let mut tried = 0;
        for before in &states {
            for incoming in every_event() {
                let (after, events) = react(before.clone(), &incoming, 13);
                let what = format!("{} on {before:?}", incoming.event_type());
                assert!(
                    events.iter().all(|e| e.event_type() != "DeliveryCompleted"),
                    "{what} published DeliveryCompleted"
                );
                let completed = |d: &OrderDelivery| matches!(d, Known(d) if d.state == DeliveryState::Completed);
                assert_eq!(
                    completed(&after),
                    completed(before),
                    "{what} changed whether the delivery is completed: {after:?}"
                );
                tried += 1;
            }
        }
        assert_eq!(tried, 8 * 18);
    }

    #[test]
    fn order_completed_confirms_the_delivery() {
        let (after, events) = react(
            Known(delivery(DeliveryState::Started, false)),
            &completed(),
            1,
        );
        let Known(d) = after else { panic!() };
        assert!(d.order_confirmed);
        assert!(events.is_empty());
    }

    #[test]
    fn order_cancelled_cancels_the_delivery_and_carries_the_initiator() {
        for initiator in [Service::Products, Service::Orders] {
            let incoming = cancelled(initiator);
            let (after, events) =
                react(Known(delivery(DeliveryState::Started, false)), &incoming, 1);
            let Known(d) = after else { panic!() };
            assert_eq!(d.state, DeliveryState::Cancelled);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].event_type(), "DeliveryCancelled");
            assert!(events[0].initiated_by_service(initiator));
            assert_eq!(events[0].causation_id, Some(incoming.event_id));
        }
    }

    #[test]
    fn order_cancelled_of_a_chain_delivery_started_is_skipped() {
        let d = delivery(DeliveryState::Cancelled, false);
        let (after, events) = react(Known(d.clone()), &cancelled(Service::Delivery), 1);
        assert_eq!(after, Known(d));
        assert!(events.is_empty());
        // even if the delivery were still started
        let d = delivery(DeliveryState::Started, false);
        let (after, events) = react(Known(d.clone()), &cancelled(Service::Delivery), 1);
        assert_eq!(after, Known(d));
        assert!(events.is_empty());
    }

    #[test]
    fn a_cancel_with_a_reason_and_initiator_this_version_does_not_know_still_calls_off() {
        // A newer producer's reason and initiator decode to fallbacks: handled, not parked.
        let json = cancelled(Service::Orders)
            .to_json()
            .replace(r#""reason":"outOfStock""#, r#""reason":"admin""#)
            .replace(r#""initiator":"orders""#, r#""initiator":"payments""#);
        let Ok(events::Decoded::Known(incoming)) = events::decode(json.as_bytes()) else {
            panic!("{json} is not a known event")
        };
        let (after, events) = react(Known(delivery(DeliveryState::Started, true)), &incoming, 1);
        let Known(d) = after else { panic!() };
        assert_eq!(d.state, DeliveryState::Cancelled);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type(), "DeliveryCancelled");
    }

    #[test]
    fn a_cancelled_or_completed_delivery_is_not_cancelled_again() {
        for state in [DeliveryState::Cancelled, DeliveryState::Completed] {
            let d = delivery(state, true);
            let (after, events) = react(Known(d.clone()), &cancelled(Service::Orders), 1);
            assert_eq!(after, Known(d));
            assert!(events.is_empty());
        }
    }

    #[test]
    fn order_cancelled_before_order_placed_voids_the_order_and_starts_nothing_later() {
        // the relay-retry reordering: OrderCancelled, then OrderPlaced
        let (after, events) = react(Unknown, &cancelled(Service::Orders), 1);
        assert_eq!(after, Voided);
        assert!(events.is_empty());
        let (after, events) = react(after, &placed(), 1);
        assert_eq!(after, Voided);
        assert!(
            events.is_empty(),
            "no DeliveryStarted for a cancelled order"
        );
    }

    fn cancel_requested() -> Envelope {
        Envelope::new(
            Service::Orders,
            Event::OrderCancelRequested(OrderCancelRequested {
                order_id: 4,
                product_id: 1,
                quantity: 1,
                customer_id: "c".into(),
                state_message: "cancel requested by the customer".into(),
            }),
        )
        .initiated_by(Service::Orders)
    }

    #[test]
    fn a_cancel_request_calls_off_a_started_delivery() {
        let request = cancel_requested();
        let (after, events) = react(Known(delivery(DeliveryState::Started, true)), &request, 1);
        let Known(d) = after else { panic!() };
        assert_eq!(d.state, DeliveryState::Cancelled);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type(), "DeliveryCancelled");
        assert!(events[0].initiated_by_service(Service::Orders));
        assert_eq!(events[0].causation_id, Some(request.event_id));
    }

    #[test]
    fn a_cancel_request_after_delivery_is_refused() {
        // completed first, then the request: the issue's race, decided here
        let (d, _) = courier_update(
            delivery(DeliveryState::Started, true),
            DeliveryState::Completed,
        )
        .unwrap();
        let (after, events) = react(Known(d.clone()), &cancel_requested(), 1);
        assert_eq!(after, Known(d));
        assert_eq!(events.len(), 1);
        let Event::CancelRefused(r) = &events[0].event else {
            panic!("expected CancelRefused, got {}", events[0].event_type())
        };
        assert_eq!(r.delivery_state, Some(DeliveryState::Completed));
        assert!(r.state_message.contains("already completed"));
        assert!(events[0].initiated_by_service(Service::Orders));
    }

    #[test]
    fn a_delivery_cancelled_by_the_request_can_no_longer_be_completed() {
        // the request first, then the courier tries to complete: refused
        let (after, _) = react(
            Known(delivery(DeliveryState::Started, true)),
            &cancel_requested(),
            1,
        );
        let Known(d) = after else { panic!() };
        assert!(courier_update(d, DeliveryState::Completed).is_err());
    }

    #[test]
    fn a_cancel_request_without_a_delivery_is_refused() {
        for current in [Unknown, Voided] {
            let (after, events) = react(current.clone(), &cancel_requested(), 1);
            assert_eq!(after, current);
            assert_eq!(events[0].event_type(), "CancelRefused");
        }
    }

    #[test]
    fn the_courier_completes_only_a_confirmed_started_delivery() {
        let (d, event) = courier_update(
            delivery(DeliveryState::Started, true),
            DeliveryState::Completed,
        )
        .unwrap();
        assert_eq!(d.state, DeliveryState::Completed);
        assert_eq!(event.event_type(), "DeliveryCompleted");
        assert_eq!(event.initiator, None);
        let err = courier_update(
            delivery(DeliveryState::Started, false),
            DeliveryState::Completed,
        )
        .unwrap_err();
        assert!(err.0.contains("not confirmed"), "{err}");
    }

    #[test]
    fn a_courier_cancel_starts_a_chain_initiated_by_delivery() {
        let (d, event) = courier_update(
            delivery(DeliveryState::Started, true),
            DeliveryState::Cancelled,
        )
        .unwrap();
        assert_eq!(d.state, DeliveryState::Cancelled);
        assert_eq!(event.event_type(), "DeliveryCancelled");
        assert!(event.initiated_by_service(Service::Delivery));
        assert_eq!(event.causation_id, None);
    }

    #[test]
    fn final_states_refuse_courier_updates() {
        for state in [DeliveryState::Completed, DeliveryState::Cancelled] {
            for target in [
                DeliveryState::Completed,
                DeliveryState::Cancelled,
                DeliveryState::Started,
            ] {
                assert!(courier_update(delivery(state, true), target).is_err());
            }
        }
        assert!(
            courier_update(
                delivery(DeliveryState::Started, true),
                DeliveryState::Started
            )
            .is_err()
        );
    }
}
