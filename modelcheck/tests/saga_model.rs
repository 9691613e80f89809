//! The saga model-checked (issue 25): every interleaving of the services' own rules within the
//! bounds of [`modelcheck::scenarios`] keeps every invariant; a rule broken on purpose is
//! caught with a readable shortest run; and with an event parked by any service (issue 24
//! item 2) every saga still ends, agreed, once the event is redriven.
//!
//! The deeper bounds: `cargo test -p modelcheck --test saga_model -- --ignored --nocapture`.

use events::{DeliveryState, Envelope, Event, Service};
use modelcheck::scenarios::{self, ONE_PARKED};
use modelcheck::{Faults, Invariant, Report, Rules, Scenario, check};
use orders::saga::{Order, OrderState};
use products::saga::{ReservationState, StockView};

fn explore(scenario: Scenario, rules: Rules) -> Report {
    let report = check(scenario, rules);
    println!("{report}\n");
    report
}

fn assert_all_hold(scenarios: Vec<Scenario>) {
    let (mut states, mut seconds) = (0, 0.0);
    for scenario in scenarios {
        let report = explore(scenario, Rules::real());
        assert!(report.complete, "the state bound stopped it:\n{report}");
        assert!(report.violation.is_none(), "{report}");
        states += report.states;
        seconds += report.elapsed.as_secs_f64();
    }
    println!("in all: {states} states in {seconds:.1} s");
}

#[test]
fn every_interleaving_of_the_real_rules_keeps_every_invariant() {
    assert_all_hold(scenarios::bounded());
}

#[test]
#[ignore = "a minute or so; scripts/test.sh runs it"]
fn deeper_bounds_keep_every_invariant() {
    assert_all_hold(scenarios::deep());
}

/// The Java original's restore: stock went back only `if stock - quantity > 0`, so releasing
/// the last unit (stock 0 after the reservation) was skipped.
fn java_restore_check(view: StockView, incoming: &Envelope) -> (StockView, Vec<Envelope>) {
    let compensation = matches!(
        incoming.event,
        Event::OrderCancelled(_) | Event::DeliveryCancelled(_)
    );
    if let (true, Some(product), Some(reservation)) =
        (compensation, &view.product, &view.reservation)
        && product.stock - reservation.quantity <= 0
    {
        return (view, Vec::new());
    }
    products::saga::react(view, incoming)
}

/// Releases from any state: a settled or released reservation is treated as reserved again.
fn release_from_any_state(mut view: StockView, incoming: &Envelope) -> (StockView, Vec<Envelope>) {
    if matches!(
        incoming.event,
        Event::OrderCancelled(_) | Event::DeliveryCancelled(_)
    ) && let Some(reservation) = view.reservation.as_mut()
        && reservation.state != ReservationState::Rejected
        && reservation.state != ReservationState::Voided
    {
        reservation.state = ReservationState::Reserved;
    }
    products::saga::react(view, incoming)
}

#[test]
fn the_java_restore_check_is_caught_with_a_readable_shortest_run() {
    let rules = Rules {
        products_react: java_restore_check,
        ..Rules::real()
    };
    let scenario = scenarios::one_order("the Java restore check", Some(1), 1, Faults::default());
    let report = explore(scenario, rules);
    let violation = report.violation.expect("the broken rule must be caught");
    assert_eq!(
        violation.invariant(),
        Invariant::ServicesAgree,
        "{violation}"
    );
    let text = violation.to_string();
    assert!(text.contains("products reads OrderCancelled"), "{text}");
    assert!(text.contains("products Reserved"), "{text}");
}

#[test]
fn releasing_from_any_state_is_caught() {
    let rules = Rules {
        products_react: release_from_any_state,
        ..Rules::real()
    };
    let scenario = scenarios::one_order("release from any state", Some(1), 1, Faults::default());
    let violation = explore(scenario, rules)
        .violation
        .expect("the broken rule must be caught");
    assert_eq!(
        violation.invariant(),
        Invariant::StockConserved,
        "{violation}"
    );
}

/// Issue 24 item 2: with parking switched on (any service parks any one saga event), every
/// saga still ends with the three services agreeing once the parked event is redriven, at
/// whatever moment the administrator does it, and an unanswered cancel request expires: the
/// request delivery parks, the refusal orders parks, a courier's cancel, a completion.
#[test]
fn a_parked_event_redriven_at_any_moment_keeps_every_invariant() {
    let scenario = scenarios::one_order("one event parked, then redriven", Some(1), 1, ONE_PARKED);
    let report = explore(scenario, Rules::real());
    assert!(report.violation.is_none(), "{}", report.violation.unwrap());
    assert!(report.complete, "{report:?}");
}

/// Nobody redrives the parked event: every saga still ends on its own — pending orders time
/// out, an unanswered cancel request expires — and only an order with a parked event may be
/// left with the services disagreeing (orders then shows the parked event on the order).
#[test]
fn a_parked_event_never_redriven_still_lets_every_saga_end() {
    let scenario = Scenario {
        redrive: false,
        ..scenarios::one_order("one event parked, never redriven", Some(1), 1, ONE_PARKED)
    };
    let report = explore(scenario, Rules::real());
    assert!(report.violation.is_none(), "{}", report.violation.unwrap());
    assert!(report.complete, "{report:?}");
}

/// What the model found before the fix (issue 24 item 2): without the request's expiry,
/// delivery parks the customer's OrderCancelRequested and the request stays open for good.
#[test]
fn without_the_request_expiry_a_parked_request_is_stuck_for_good() {
    let rules = Rules {
        expire_cancel_request: |_, _| None,
        ..Rules::real()
    };
    let scenario = Scenario {
        redrive: false,
        ..scenarios::one_order("one event parked, no expiry", Some(1), 1, ONE_PARKED)
    };
    let violation = explore(scenario, rules)
        .violation
        .expect("an open request with nothing to close it");
    assert_eq!(violation.invariant(), Invariant::SagaEnds, "{violation}");
    assert!(violation.to_string().contains("PARKS"), "{violation}");
}

/// The old rule 8, which honoured delivery's yes only while the request was open: once the
/// request can expire, delivery's late yes cancels the delivery and orders ignores it, so the
/// services disagree for good. The model finds it without any parking.
fn yes_only_to_an_open_request(order: Order, incoming: &Envelope) -> (Order, Vec<Envelope>) {
    let late_yes = matches!(incoming.event, Event::DeliveryCancelled(_))
        && incoming.initiated_by_service(Service::Orders)
        && !order.cancel_requested
        && order.state == OrderState::Completed;
    if late_yes {
        let mut order = order;
        order.delivery_state = Some(DeliveryState::Cancelled);
        return (order, Vec::new());
    }
    orders::saga::react(order, incoming)
}

#[test]
fn ignoring_a_late_yes_to_an_expired_request_is_caught() {
    let rules = Rules {
        orders_react: yes_only_to_an_open_request,
        ..Rules::real()
    };
    let scenario = scenarios::one_order("late yes ignored", Some(1), 1, Faults::default());
    let violation = explore(scenario, rules)
        .violation
        .expect("the broken rule must be caught");
    assert_eq!(
        violation.invariant(),
        Invariant::ServicesAgree,
        "{violation}"
    );
    assert!(
        violation.to_string().contains("unanswered cancel request"),
        "{violation}"
    );
}
