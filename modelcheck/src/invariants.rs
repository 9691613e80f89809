//! The saga's invariants, checked on every state the model reaches, and at quiescence (the
//! saga has nothing left to do by itself) the ones about how every saga ends.

use crate::model::{Model, World};
use delivery::saga::{DeliveryState, OrderDelivery};
use events::Event;
use orders::saga::OrderState;
use products::saga::ReservationState;
use std::fmt;

/// An invariant of the saga; its `Display` is the sentence a failing run prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// Per product: stock + reserved + delivered = initial stock + administrators' changes.
    StockConserved,
    /// Per order: at most one OrderPlaced, OrderCompleted, OrderCancelled, StockDecreased,
    /// StockIncreased, DeliveryStarted, DeliveryCompleted (republished copies aside).
    AtMostOnce,
    /// A delivered order is never restocked or cancelled.
    DeliveredIsFinal,
    /// At quiescence: every order terminal and no cancel request left open.
    SagaEnds,
    /// At quiescence: orders, products and delivery agree on each order.
    ServicesAgree,
    /// At quiescence, per product: reserved + delivered = the units of completed orders.
    ReservedIsCompleted,
    /// At quiescence: orders' catalog replica shows products' stock.
    ReplicaCurrent,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::StockConserved => {
                "stock + reserved + delivered = initial stock + catalog changes, per product"
            }
            Invariant::AtMostOnce => {
                "at most one OrderPlaced, OrderCompleted, OrderCancelled, StockDecreased, \
                 StockIncreased, DeliveryStarted, DeliveryCompleted per order"
            }
            Invariant::DeliveredIsFinal => "a delivered order is never restocked or cancelled",
            Invariant::SagaEnds => {
                "at quiescence every order is terminal and no cancel request is open"
            }
            Invariant::ServicesAgree => "at quiescence the three services agree on each order",
            Invariant::ReservedIsCompleted => {
                "at quiescence reserved + delivered = units of completed orders, per product"
            }
            Invariant::ReplicaCurrent => "at quiescence orders' catalog replica is current",
        })
    }
}

/// A broken invariant and what broke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Which invariant.
    pub invariant: Invariant,
    /// The order or product and the numbers.
    pub detail: String,
}

fn broken(invariant: Invariant, detail: String) -> Result<(), Broken> {
    Err(Broken { invariant, detail })
}

/// The event types that happen at most once per order.
const ONCE: [&str; 7] = [
    "OrderPlaced",
    "OrderCompleted",
    "OrderCancelled",
    "StockDecreased",
    "StockIncreased",
    "DeliveryStarted",
    "DeliveryCompleted",
];

/// The invariants that hold in every state.
pub fn always(model: &Model, world: &World) -> Result<(), Broken> {
    for (p, entry) in world.catalog.iter().enumerate() {
        let Some(product) = entry.product.map(|id| model.products.get(id)) else {
            continue;
        };
        let spec = &model.scenario.products[p];
        let (reserved, delivered) = committed_units(model, world, spec.id);
        let initial = spec.stock.unwrap_or_default();
        if product.stock + reserved + delivered != initial + entry.adjusted || product.stock < 0 {
            return broken(
                Invariant::StockConserved,
                format!(
                    "product {}: stock {} + reserved {reserved} + delivered {delivered} ≠ \
                     initial {initial} {:+} by administrators",
                    spec.id, product.stock, entry.adjusted
                ),
            );
        }
    }
    for (o, saga) in world.sagas.iter().enumerate() {
        let order_id = model.scenario.orders[o].id;
        let originals: Vec<&Event> = saga
            .topic
            .iter()
            .map(|&id| model.events.get(id))
            .filter(|e| !e.republished)
            .map(|e| &e.event)
            .collect();
        let count = |t: &str| originals.iter().filter(|e| e.event_type() == t).count();
        if let Some(twice) = ONCE.into_iter().find(|&t| count(t) > 1) {
            return broken(
                Invariant::AtMostOnce,
                format!("order {order_id}: {} × {twice}", count(twice)),
            );
        }
        let delivery_completed = matches!(
            model.deliveries.get(saga.delivery),
            OrderDelivery::Known(d) if d.state == DeliveryState::Completed
        );
        if count("DeliveryCompleted") > 0 || delivery_completed {
            let order = saga.order.map(|id| model.orders.get(id));
            let reservation = saga.reservation.map(|id| model.reservations.get(id).state);
            let undone = if count("StockIncreased") > 0 {
                Some("StockIncreased on its partition")
            } else if count("OrderCancelled") > 0 {
                Some("OrderCancelled on its partition")
            } else if order.is_some_and(|o| o.state == OrderState::Cancelled) {
                Some("orders says cancelled")
            } else if reservation == Some(ReservationState::Released) {
                Some("products released its units")
            } else {
                None
            };
            if let Some(undone) = undone {
                return broken(
                    Invariant::DeliveredIsFinal,
                    format!("order {order_id} was delivered, yet {undone}"),
                );
            }
        }
    }
    Ok(())
}

/// The invariants about how sagas end, for a quiescent state.
pub fn at_quiescence(model: &Model, world: &World) -> Result<(), Broken> {
    for (o, saga) in world.sagas.iter().enumerate() {
        let Some(order) = saga.order.map(|id| model.orders.get(id)) else {
            continue; // never placed
        };
        let order_id = order.id;
        if order.state == OrderState::Placed || order.cancel_requested {
            let why = if order.cancel_requested {
                "its cancel request is never answered"
            } else {
                "it stays pending"
            };
            return broken(
                Invariant::SagaEnds,
                format!("order {order_id}: {why} ({})", model.summary_of(world, o)),
            );
        }
        let reservation = saga.reservation.map(|id| model.reservations.get(id).state);
        let delivery = match model.deliveries.get(saga.delivery) {
            OrderDelivery::Known(d) => Some(d.state),
            OrderDelivery::Voided | OrderDelivery::Unknown => None,
        };
        use DeliveryState::{Cancelled, Completed, Started};
        use ReservationState::{Delivered, Rejected, Released, Reserved, Voided};
        let agree = match order.state {
            OrderState::Cancelled => {
                matches!(reservation, Some(Rejected | Released | Voided))
                    && matches!(delivery, None | Some(Cancelled))
                    && !matches!(model.deliveries.get(saga.delivery), OrderDelivery::Unknown)
                    && matches!(order.delivery_state, None | Some(Cancelled))
            }
            OrderState::Completed => matches!(
                (reservation, delivery, order.delivery_state),
                (Some(Reserved), Some(Started), Some(Started))
                    | (Some(Delivered), Some(Completed), Some(Completed))
            ),
            OrderState::Placed => false,
        };
        // A parked event nobody redrove: the services may disagree on this order (orders
        // shows the parked event), but it ended.
        if !agree && saga.parked.is_none() {
            return broken(
                Invariant::ServicesAgree,
                format!("order {order_id}: {}", model.summary_of(world, o)),
            );
        }
    }
    for (p, entry) in world.catalog.iter().enumerate() {
        let Some(product) = entry.product.map(|id| model.products.get(id)) else {
            continue;
        };
        let product_id = model.scenario.products[p].id;
        let (reserved, delivered) = committed_units(model, world, product_id);
        let completed: i64 = world
            .sagas
            .iter()
            .filter_map(|s| s.order.map(|id| model.orders.get(id)))
            .filter(|o| o.product_id == product_id && o.state == OrderState::Completed)
            .map(|o| o.quantity)
            .sum();
        let parked = world.sagas.iter().any(|s| s.parked.is_some());
        if reserved + delivered != completed && !parked {
            return broken(
                Invariant::ReservedIsCompleted,
                format!(
                    "product {product_id}: reserved {reserved} + delivered {delivered} ≠ \
                     {completed} units of completed orders"
                ),
            );
        }
        let replica = entry.last_changed.map(|id| &model.events.get(id).event);
        let replica_stock = match replica {
            Some(Event::ProductChanged(p)) => Some(p.product_stock),
            _ => None,
        };
        if replica_stock != Some(product.stock) {
            return broken(
                Invariant::ReplicaCurrent,
                format!(
                    "product {product_id}: products has stock {}, orders' replica {replica_stock:?}",
                    product.stock
                ),
            );
        }
    }
    Ok(())
}

/// Units of a product reserved and delivered, by products' reservations.
fn committed_units(model: &Model, world: &World, product_id: i64) -> (i64, i64) {
    let mut reserved = 0;
    let mut delivered = 0;
    for r in world
        .sagas
        .iter()
        .filter_map(|s| s.reservation.map(|id| model.reservations.get(id)))
        .filter(|r| r.product_id == product_id)
    {
        match r.state {
            ReservationState::Reserved => reserved += r.quantity,
            ReservationState::Delivered => delivered += r.quantity,
            _ => {}
        }
    }
    (reserved, delivered)
}
