//! The model: the topic as one partition per order (and one per product for the catalog),
//! each service's state as its rules see it, and every action that moves the saga on.
//!
//! Each service reads each partition in order at its own pace. Reading an event runs the
//! service's own rule (through [`Rules`]) on what the service's reactor would load, stores
//! what the rule returns and appends the events it causes to their partitions, in one step:
//! the consumer commits the effects, the caused events and its position in one transaction,
//! and the relay publishes a service's events in commit order (a delay in publishing adds no
//! ordering the model lacks: whatever could overtake the event could have been committed
//! first). Faults, each with a budget: the relay publishing an event again, a restart that
//! loses a service's uncommitted transaction, an event parked by a service, and catalog
//! changes by an administrator.

use crate::rules::Rules;
use delivery::saga::{DeliveryState, OrderDelivery};
use events::{Envelope, Event, Service};
use kafka::Reactor;
use orders::saga::{CustomerCancel, Order, OrderState};
use products::saga::{Product, StockReservation, StockView};
use std::collections::HashMap;
use std::fmt::{self, Debug};

/// The three services, in the order the model keeps their positions.
pub const SERVICES: [Service; 3] = [Service::Orders, Service::Products, Service::Delivery];

/// A product in the catalog at the start; `stock: None` is a product that does not exist.
#[derive(Debug, Clone)]
pub struct ProductSpec {
    /// Product id.
    pub id: i64,
    /// Units on hand at the start; `None` when the product does not exist.
    pub stock: Option<i64>,
}

/// An order a customer may place.
#[derive(Debug, Clone)]
pub struct OrderSpec {
    /// Order id.
    pub id: i64,
    /// What it orders.
    pub product_id: i64,
    /// How many.
    pub quantity: i64,
    /// Whether its customer may cancel it and its courier complete or cancel its delivery
    /// (without, only the saga and its timeout move it: a smaller space, for several orders).
    pub people: bool,
}

/// How many faults of each kind one run may contain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Faults {
    /// The relay publishes an already published saga event again (a crash between the
    /// broker's acknowledgement and marking the row); every consumer reads the copy and its
    /// rules must ignore it, even with the inbox's record of the id pruned.
    pub republished: u8,
    /// A service restarts from its last committed position, losing the transaction it had
    /// open.
    pub restarts: u8,
    /// A service parks the next saga event it reads: its position moves past it, no effect.
    pub parked: u8,
    /// An administrator changes a product's stock (`PATCH /products/{id}`: restock by one, or
    /// set to 0), publishing ProductChanged.
    pub catalog_changes: u8,
}

/// What is explored: the catalog, the orders customers may place, and the fault budget.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// The catalog at the start.
    pub products: Vec<ProductSpec>,
    /// The orders customers may place (each at most once, at any moment).
    pub orders: Vec<OrderSpec>,
    /// The fault budget of one run.
    pub faults: Faults,
    /// Stop (and report the run incomplete) past this many states.
    pub max_states: usize,
    /// Whether an administrator redrives a parked event (at any moment; then the saga must
    /// end agreed). Without, nobody does: every saga must still end (terminal, no request
    /// open), and only an order with a parked event may be left disagreeing.
    pub redrive: bool,
}

/// One event on the topic, as the rules read it: the event, its sender and its chain's
/// initiator (event ids, times and causation links are not read by any rule).
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The event.
    pub event: Event,
    /// Who published it.
    pub source: Service,
    /// The chain's initiator.
    pub initiator: Option<Service>,
    /// A copy the relay published again.
    pub republished: bool,
}

impl Published {
    fn from_envelope(envelope: &Envelope) -> Self {
        Published {
            event: envelope.event.clone(),
            source: envelope.source,
            initiator: envelope.initiator,
            republished: false,
        }
    }

    /// The envelope a consumer decodes from it.
    pub fn envelope(&self) -> Envelope {
        let mut envelope = Envelope::new(self.source, self.event.clone());
        envelope.initiator = self.initiator;
        envelope
    }

    /// The event in a trace: its type and the detail that tells it apart.
    pub fn describe(&self) -> String {
        let chain = match self.initiator {
            Some(service) => format!(", initiator {service}"),
            None => String::new(),
        };
        let detail = match &self.event {
            Event::ProductChanged(p) => {
                format!(" (product {}, stock {})", p.product_id, p.product_stock)
            }
            Event::StockDecreased(m) | Event::StockIncreased(m) => {
                format!(
                    " (quantity {}, stock {} after{chain})",
                    m.quantity, m.product_stock
                )
            }
            Event::OrderCancelled(c) => format!(
                " ({}{chain})",
                c.reason
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(|| "no reason".into())
            ),
            Event::CancelRefused(r) => format!(" (\"{}\"{chain})", r.state_message),
            _ if !chain.is_empty() => format!(" ({})", chain.trim_start_matches(", ")),
            _ => String::new(),
        };
        let copy = if self.republished {
            " [republished copy]"
        } else {
            ""
        };
        format!("{}{detail}{copy}", self.event.event_type())
    }
}

/// Values stored once and named by index, so a world state is a few small numbers that hash
/// fast; two values are the same when they print the same (`Debug` shows every field).
#[derive(Debug)]
pub struct Interner<T> {
    values: Vec<T>,
    ids: HashMap<String, usize>,
}

impl<T: Debug> Interner<T> {
    fn new() -> Self {
        Interner {
            values: Vec::new(),
            ids: HashMap::new(),
        }
    }

    fn id(&mut self, value: T) -> usize {
        let key = format!("{value:?}");
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        self.values.push(value);
        self.ids.insert(key, self.values.len() - 1);
        self.values.len() - 1
    }

    /// The value named `id`.
    pub fn get(&self, id: usize) -> &T {
        &self.values[id]
    }
}

/// One order's saga: its partition and what each service knows about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SagaWorld {
    /// The order's partition, oldest first.
    pub topic: Vec<usize>,
    /// Each service's position in it (next offset to read), in [`SERVICES`] order.
    pub read: [usize; 3],
    /// Orders' order; `None` until placed.
    pub order: Option<usize>,
    /// Products' reservation for it.
    pub reservation: Option<usize>,
    /// Delivery's knowledge of it.
    pub delivery: usize,
    /// The event a service parked (service index, event) and nobody has redriven yet.
    pub parked: Option<(usize, usize)>,
    /// The customer's cancel requests so far (bounded: a request delivery leaves unanswered
    /// expires, and the customer may ask again).
    pub requests: u8,
}

/// One product: products' entry and the last event of its catalog partition.
///
/// Orders reads that partition into its catalog replica, which no rule reads (an order's
/// price is for display), so its reading commutes with every other step: instead of
/// interleaving it, the model keeps only the partition's last ProductChanged, which is what
/// the replica shows once orders has read to the end, and checks it at quiescence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CatalogWorld {
    /// Products' entry; `None` when the product does not exist.
    pub product: Option<usize>,
    /// The last ProductChanged on the product's partition.
    pub last_changed: Option<usize>,
    /// Net units added by administrators, for the stock ledger.
    pub adjusted: i64,
}

/// Everything the saga is at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct World {
    /// One per planned order, in [`Scenario::orders`] order.
    pub sagas: Vec<SagaWorld>,
    /// One per product, in [`Scenario::products`] order.
    pub catalog: Vec<CatalogWorld>,
    /// Faults still allowed.
    pub budget: Faults,
    /// Per service: the order whose next event it applied in a transaction not yet committed.
    pub in_flight: [Option<usize>; 3],
}

/// One step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The customer places an order (`POST /orders`).
    Place(usize),
    /// A service reads the next event it acts on in an order's partition and commits.
    Read(Service, usize),
    /// A service applies the next event in a transaction it has not committed yet.
    ReadUncommitted(Service, usize),
    /// A service commits its open transaction.
    Commit(Service),
    /// A service restarts: its open transaction is lost; it reads on from its last committed
    /// position.
    Restart(Service),
    /// The customer cancels (`PATCH /orders/{id}`).
    CustomerCancel(usize),
    /// The courier completes the delivery.
    CourierComplete(usize),
    /// The courier cancels the delivery.
    CourierCancel(usize),
    /// Orders' saga timeout fires.
    TimeOut(usize),
    /// Orders' saga timeout closes the order's unanswered cancel request.
    ExpireRequest(usize),
    /// An administrator redrives the order's parked event to the service that parked it.
    Redrive(usize),
    /// An administrator adds one unit of stock.
    Restock(usize),
    /// An administrator sets the stock to 0.
    SellOff(usize),
    /// The relay publishes the event at this offset of the order's partition again.
    Republish(usize, usize),
    /// A service parks the next event it acts on in the order's partition.
    Park(Service, usize),
}

/// What one action did, for traces.
#[derive(Debug, Clone, Default)]
pub struct Effect {
    /// The event read, if the action read one.
    pub read: Option<usize>,
    /// The events published.
    pub published: Vec<usize>,
}

/// The saga timeout handed to [`orders::saga::time_out`]; only its message uses it.
const TIMEOUT_SECS: u64 = 30;

/// Cancel requests one customer makes at most per order: the first, and one more after it
/// expired unanswered.
const MAX_REQUESTS: u8 = 2;

/// The model of one scenario: its rules and the values its states name.
pub struct Model {
    /// What is explored.
    pub scenario: Scenario,
    /// The rules the services run.
    pub rules: Rules,
    /// Orders' orders.
    pub orders: Interner<Order>,
    /// Products' reservations.
    pub reservations: Interner<StockReservation>,
    /// Products' catalog entries.
    pub products: Interner<Product>,
    /// Delivery's deliveries.
    pub deliveries: Interner<OrderDelivery>,
    /// The events on the topic.
    pub events: Interner<Published>,
}

impl Model {
    /// A model of `scenario` whose services run `rules`.
    pub fn new(scenario: Scenario, rules: Rules) -> Self {
        Model {
            scenario,
            rules,
            orders: Interner::new(),
            reservations: Interner::new(),
            products: Interner::new(),
            deliveries: Interner::new(),
            events: Interner::new(),
        }
    }

    /// The world before anything happened: products created (their ProductChanged on the
    /// topic), no order placed.
    pub fn initial(&mut self) -> World {
        let unknown = self.deliveries.id(OrderDelivery::Unknown);
        let sagas = (0..self.scenario.orders.len())
            .map(|_| SagaWorld {
                topic: Vec::new(),
                read: [0; 3],
                order: None,
                reservation: None,
                delivery: unknown,
                parked: None,
                requests: 0,
            })
            .collect();
        let specs = self.scenario.products.clone();
        let catalog = specs
            .iter()
            .map(|spec| {
                let product = spec.stock.map(|stock| Product {
                    id: spec.id,
                    name: format!("product {}", spec.id),
                    price: 100,
                    stock,
                    reserved: 0,
                    delivered: 0,
                });
                let last_changed = product.as_ref().map(|p| {
                    self.events
                        .id(published(&Envelope::new(Service::Products, p.changed())))
                });
                CatalogWorld {
                    product: product.map(|p| self.products.id(p)),
                    last_changed,
                    adjusted: 0,
                }
            })
            .collect();
        World {
            sagas,
            catalog,
            budget: self.scenario.faults,
            in_flight: [None; 3],
        }
    }

    /// Every action worth trying in `world` (some may turn out to change nothing).
    pub fn actions(&self, world: &World) -> Vec<Action> {
        let mut actions = Vec::new();
        for (o, saga) in world.sagas.iter().enumerate() {
            if saga.order.is_none() {
                actions.push(Action::Place(o));
                continue;
            }
            for (s, &service) in SERVICES.iter().enumerate() {
                if world.in_flight[s].is_some() || self.next_wanted(saga, s).is_none() {
                    continue;
                }
                actions.push(Action::Read(service, o));
                if world.budget.restarts > 0 {
                    actions.push(Action::ReadUncommitted(service, o));
                }
                if world.budget.parked > 0 {
                    actions.push(Action::Park(service, o));
                }
            }
            actions.push(Action::TimeOut(o));
            actions.push(Action::ExpireRequest(o));
            if saga.parked.is_some() && self.scenario.redrive {
                actions.push(Action::Redrive(o));
            }
            if self.scenario.orders[o].people {
                actions.extend([
                    Action::CustomerCancel(o),
                    Action::CourierComplete(o),
                    Action::CourierCancel(o),
                ]);
            }
            if world.budget.republished > 0 {
                for (offset, &id) in saga.topic.iter().enumerate() {
                    if !self.events.get(id).republished {
                        actions.push(Action::Republish(o, offset));
                    }
                }
            }
        }
        for (s, &service) in SERVICES.iter().enumerate() {
            if world.in_flight[s].is_some() {
                actions.push(Action::Commit(service));
                if world.budget.restarts > 0 {
                    actions.push(Action::Restart(service));
                }
            }
        }
        for (p, product) in world.catalog.iter().enumerate() {
            if product.product.is_some() && world.budget.catalog_changes > 0 {
                actions.extend([Action::Restock(p), Action::SellOff(p)]);
            }
        }
        actions
    }

    /// Runs `action` on `world`: the world after it and what it did, or `None` when it is not
    /// possible there or changes nothing (a refused PATCH, a timeout of a settled order).
    pub fn apply(&mut self, world: &World, action: Action) -> Option<(World, Effect)> {
        let mut next = world.clone();
        let mut effect = Effect::default();
        match action {
            Action::Place(o) => {
                let spec = self.scenario.orders[o].clone();
                let order = Order {
                    id: spec.id,
                    product_id: spec.product_id,
                    product_name: None,
                    quantity: spec.quantity,
                    price: None,
                    customer_id: "customer".into(),
                    customer_name: None,
                    customer_addr: None,
                    state: OrderState::Placed,
                    stock_reserved: false,
                    delivery_id: None,
                    delivery_state: None,
                    cancel_requested: false,
                    state_message: None,
                };
                let event = (self.rules.placed)(&order);
                next.sagas[o].order = Some(self.orders.id(order));
                self.publish(&mut next, &[event], &mut effect);
            }
            Action::Read(service, o) => {
                let s = index(service);
                let offset = self.next_wanted(&world.sagas[o], s)?;
                next.sagas[o].read[s] = offset + 1;
                let id = world.sagas[o].topic[offset];
                effect.read = Some(id);
                self.deliver(&mut next, service, o, id, &mut effect);
            }
            Action::ReadUncommitted(service, o) => {
                let s = index(service);
                self.next_wanted(&world.sagas[o], s)?;
                next.in_flight[s] = Some(o);
            }
            Action::Commit(service) => {
                let s = index(service);
                let o = world.in_flight[s]?;
                next.in_flight[s] = None;
                let offset = self.next_wanted(&world.sagas[o], s)?;
                next.sagas[o].read[s] = offset + 1;
                let id = world.sagas[o].topic[offset];
                effect.read = Some(id);
                self.deliver(&mut next, service, o, id, &mut effect);
            }
            Action::Restart(service) => {
                let s = index(service);
                world.in_flight[s]?;
                next.in_flight[s] = None;
                next.budget.restarts -= 1;
            }
            Action::CustomerCancel(o) => {
                if world.sagas[o].requests >= MAX_REQUESTS {
                    return None;
                }
                let order = self.orders.get(world.sagas[o].order?).clone();
                let (order, event) = match (self.rules.cancel_by_customer)(order).ok()? {
                    CustomerCancel::Cancelled(order, event) => (order, event),
                    CustomerCancel::Requested(order, event) => {
                        next.sagas[o].requests += 1;
                        (order, event)
                    }
                };
                next.sagas[o].order = Some(self.orders.id(order));
                self.publish(&mut next, &[event], &mut effect);
            }
            Action::CourierComplete(o) | Action::CourierCancel(o) => {
                let OrderDelivery::Known(delivery) = self.deliveries.get(world.sagas[o].delivery)
                else {
                    return None;
                };
                let target = if matches!(action, Action::CourierComplete(_)) {
                    DeliveryState::Completed
                } else {
                    DeliveryState::Cancelled
                };
                let (delivery, event) =
                    (self.rules.courier_update)(delivery.clone(), target).ok()?;
                next.sagas[o].delivery = self.deliveries.id(OrderDelivery::Known(delivery));
                self.publish(&mut next, &[event], &mut effect);
            }
            Action::TimeOut(o) => {
                let order = self.orders.get(world.sagas[o].order?).clone();
                let (order, event) = (self.rules.time_out)(order, TIMEOUT_SECS)?;
                next.sagas[o].order = Some(self.orders.id(order));
                self.publish(&mut next, &[event], &mut effect);
            }
            Action::ExpireRequest(o) => {
                // Orders closes a request only once it has read the topic past the request's
                // deadline (`orders/src/timeouts.rs`): an answer already there wins.
                if self
                    .next_wanted(&world.sagas[o], index(Service::Orders))
                    .is_some()
                {
                    return None;
                }
                let order = self.orders.get(world.sagas[o].order?).clone();
                let (order, event) = (self.rules.expire_cancel_request)(order, TIMEOUT_SECS)?;
                next.sagas[o].order = Some(self.orders.id(order));
                self.publish(&mut next, &[event], &mut effect);
            }
            Action::Redrive(o) => {
                let (s, id) = world.sagas[o].parked?;
                next.sagas[o].parked = None;
                effect.read = Some(id);
                self.deliver(&mut next, SERVICES[s], o, id, &mut effect);
            }
            Action::Restock(p) | Action::SellOff(p) => {
                let mut product = self.products.get(world.catalog[p].product?).clone();
                let stock = if matches!(action, Action::Restock(_)) {
                    product.stock + 1
                } else {
                    0
                };
                if stock == product.stock {
                    return None;
                }
                next.catalog[p].adjusted += stock - product.stock;
                product.stock = stock;
                let event = Envelope::new(Service::Products, product.changed());
                next.catalog[p].product = Some(self.products.id(product));
                next.budget.catalog_changes -= 1;
                self.publish(&mut next, &[event], &mut effect);
            }
            Action::Republish(o, offset) => {
                let mut copy = self.events.get(world.sagas[o].topic[offset]).clone();
                copy.republished = true;
                let id = self.events.id(copy);
                next.sagas[o].topic.push(id);
                next.budget.republished -= 1;
                effect.published.push(id);
            }
            Action::Park(service, o) => {
                let s = index(service);
                let offset = self.next_wanted(&world.sagas[o], s)?;
                next.sagas[o].read[s] = offset + 1;
                next.budget.parked -= 1;
                next.sagas[o].parked = Some((s, world.sagas[o].topic[offset]));
                effect.read = Some(world.sagas[o].topic[offset]);
            }
        }
        (next != *world).then_some((next, effect))
    }

    /// The offset of the next event in the saga's partition that the service acts on; the
    /// others its consumer skips without touching its database.
    fn next_wanted(&self, saga: &SagaWorld, s: usize) -> Option<usize> {
        (saga.read[s]..saga.topic.len())
            .find(|&offset| wants(SERVICES[s], &self.events.get(saga.topic[offset]).envelope()))
    }

    /// One service applies one event of an order's partition through its rule, with what its
    /// reactor loads and stores around the rule.
    fn deliver(
        &mut self,
        world: &mut World,
        service: Service,
        o: usize,
        id: usize,
        effect: &mut Effect,
    ) {
        let incoming = self.events.get(id).envelope();
        let caused = match service {
            Service::Orders => {
                // Orders' reactor refuses (parks) an event for an order it does not have;
                // impossible here, as every event of a saga follows its OrderPlaced.
                let Some(order) = world.sagas[o].order else {
                    return;
                };
                let (after, caused) =
                    (self.rules.orders_react)(self.orders.get(order).clone(), &incoming);
                world.sagas[o].order = Some(self.orders.id(after));
                caused
            }
            Service::Products => {
                // As products' reactor: the reservation, and the product it names (or the
                // OrderPlaced names, before there is one).
                let reservation = world.sagas[o]
                    .reservation
                    .map(|r| self.reservations.get(r).clone());
                let product_id = match (&incoming.event, &reservation) {
                    (_, Some(r)) => Some(r.product_id),
                    (Event::OrderPlaced(placed), None) => Some(placed.product_id),
                    _ => None,
                };
                let p = product_id.and_then(|id| self.product_index(id));
                let product = p
                    .and_then(|p| world.catalog[p].product)
                    .map(|id| self.products.get(id).clone());
                let before = StockView {
                    product,
                    reservation,
                };
                let (after, caused) = (self.rules.products_react)(before.clone(), &incoming);
                if let Some(product) = after.product.filter(|p| Some(p) != before.product.as_ref())
                    && let Some(p) = self.product_index(product.id)
                {
                    world.catalog[p].product = Some(self.products.id(product));
                }
                if let Some(r) = after
                    .reservation
                    .filter(|r| Some(r) != before.reservation.as_ref())
                {
                    world.sagas[o].reservation = Some(self.reservations.id(r));
                }
                caused
            }
            Service::Delivery => {
                let before = self.deliveries.get(world.sagas[o].delivery).clone();
                // A delivery's id is its order's: ids only need to be unique.
                let next_id = self.scenario.orders[o].id;
                let (after, caused) = (self.rules.delivery_react)(before, &incoming, next_id);
                world.sagas[o].delivery = self.deliveries.id(after);
                caused
            }
        };
        self.publish(world, &caused, effect);
    }

    /// Appends events to their partitions: saga events by order, catalog events by product.
    fn publish(&mut self, world: &mut World, events: &[Envelope], effect: &mut Effect) {
        for envelope in events {
            let id = self.events.id(published(envelope));
            match &envelope.event {
                Event::ProductChanged(p) => {
                    if let Some(p) = self.product_index(p.product_id) {
                        world.catalog[p].last_changed = Some(id);
                    }
                }
                event => {
                    if let Some(o) = event.order_id().and_then(|id| self.order_index(id)) {
                        world.sagas[o].topic.push(id);
                    }
                }
            }
            effect.published.push(id);
        }
    }

    /// The index of a product in the scenario.
    pub fn product_index(&self, product_id: i64) -> Option<usize> {
        self.scenario
            .products
            .iter()
            .position(|p| p.id == product_id)
    }

    /// The index of an order in the scenario.
    pub fn order_index(&self, order_id: i64) -> Option<usize> {
        self.scenario.orders.iter().position(|o| o.id == order_id)
    }

    /// True when the saga has nothing left to do by itself: every service read every
    /// partition to its end, no transaction is open and no timeout is due. People (customer,
    /// courier, administrator) may still act.
    pub fn quiescent(&self, world: &World) -> bool {
        world.in_flight.iter().all(Option::is_none)
            && world.sagas.iter().all(|saga| {
                (0..SERVICES.len()).all(|s| self.next_wanted(saga, s).is_none())
                    && (saga.parked.is_none() || !self.scenario.redrive)
                    && saga.order.is_none_or(|order| {
                        let order = self.orders.get(order);
                        (self.rules.time_out)(order.clone(), TIMEOUT_SECS).is_none()
                            && (self.rules.expire_cancel_request)(order.clone(), TIMEOUT_SECS)
                                .is_none()
                    })
            })
    }

    /// A step of a trace in the saga's words.
    pub fn describe(&self, action: Action, effect: &Effect) -> String {
        let order = |o: usize| self.scenario.orders[o].id;
        let product = |p: usize| self.scenario.products[p].id;
        let read = effect
            .read
            .map(|id| self.events.get(id).describe())
            .unwrap_or_default();
        let what = match action {
            Action::Place(o) => {
                let spec = &self.scenario.orders[o];
                format!(
                    "customer places order {} ({} × product {})",
                    spec.id, spec.quantity, spec.product_id
                )
            }
            Action::Read(service, o) => format!("{service} reads {read} of order {}", order(o)),
            Action::ReadUncommitted(service, o) => format!(
                "{service} applies the next event of order {} without committing yet",
                order(o)
            ),
            Action::Commit(service) => format!("{service} commits its reading of {read}"),
            Action::Restart(service) => {
                format!("{service} restarts from its last committed position")
            }
            Action::CustomerCancel(o) => format!("customer cancels order {}", order(o)),
            Action::CourierComplete(o) => {
                format!("courier completes the delivery of order {}", order(o))
            }
            Action::CourierCancel(o) => {
                format!("courier cancels the delivery of order {}", order(o))
            }
            Action::TimeOut(o) => format!("saga timeout fires for order {}", order(o)),
            Action::ExpireRequest(o) => {
                format!(
                    "saga timeout closes order {}'s unanswered cancel request",
                    order(o)
                )
            }
            Action::Redrive(o) => format!("administrator REDRIVES {read} of order {}", order(o)),
            Action::Restock(p) => format!("administrator adds 1 unit of product {}", product(p)),
            Action::SellOff(p) => format!("administrator sets product {}'s stock to 0", product(p)),
            Action::Republish(o, offset) => format!(
                "relay publishes order {}'s event #{} again",
                order(o),
                offset + 1
            ),
            Action::Park(service, o) => format!("{service} PARKS {read} of order {}", order(o)),
        };
        let published: Vec<String> = effect
            .published
            .iter()
            .map(|&id| self.events.get(id).describe())
            .collect();
        if published.is_empty() || matches!(action, Action::Republish(..)) {
            what
        } else {
            format!("{what} → {}", published.join(", "))
        }
    }

    /// One order as the three services see it, and its partition.
    pub fn summary_of(&self, world: &World, o: usize) -> String {
        let saga = &world.sagas[o];
        let Some(order) = saga.order.map(|id| self.orders.get(id)) else {
            return "not placed".into();
        };
        let reservation = saga
            .reservation
            .map(|id| format!("{:?}", self.reservations.get(id).state))
            .unwrap_or_else(|| "nothing decided".into());
        let delivery = match self.deliveries.get(saga.delivery) {
            OrderDelivery::Known(d) => d.state.to_string(),
            other => format!("{other:?}"),
        };
        let requested = if order.cancel_requested {
            ", cancel requested"
        } else {
            ""
        };
        let known = order
            .delivery_state
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into());
        let topic: Vec<&str> = saga
            .topic
            .iter()
            .map(|&id| self.events.get(id).event.event_type())
            .collect();
        format!(
            "orders {}{requested} (delivery {known}), products {reservation}, delivery \
             {delivery}; partition: {}",
            order.state,
            topic.join(", ")
        )
    }

    /// Each order as the three services see it, and each product's stock.
    pub fn summary(&self, world: &World) -> String {
        let mut lines: Vec<String> = (0..world.sagas.len())
            .filter(|&o| world.sagas[o].order.is_some())
            .map(|o| {
                format!(
                    "order {}: {}",
                    self.scenario.orders[o].id,
                    self.summary_of(world, o)
                )
            })
            .collect();
        for (p, entry) in world.catalog.iter().enumerate() {
            if let Some(product) = entry.product.map(|id| self.products.get(id)) {
                lines.push(format!(
                    "product {}: stock {} (administrators {:+})",
                    self.scenario.products[p].id, product.stock, entry.adjusted
                ));
            }
        }
        lines.join("\n")
    }
}

/// Whether the service's consumer hands this event to its rules: the reactors' own filter.
pub fn wants(service: Service, event: &Envelope) -> bool {
    match service {
        Service::Orders => orders::reactor::OrderReactor.wants(event),
        Service::Products => products::reactor::StockReactor.wants(event),
        Service::Delivery => delivery::reactor::DeliveryReactor.wants(event),
    }
}

/// The position of a service in [`SERVICES`].
pub fn index(service: Service) -> usize {
    match service {
        Service::Orders => 0,
        Service::Products => 1,
        Service::Delivery => 2,
    }
}

fn published(envelope: &Envelope) -> Published {
    Published::from_envelope(envelope)
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let products: Vec<String> = self
            .products
            .iter()
            .map(|p| match p.stock {
                Some(stock) => format!("product {} stock {stock}", p.id),
                None => format!("product {} missing", p.id),
            })
            .collect();
        let orders: Vec<String> = self
            .orders
            .iter()
            .map(|o| {
                let people = if o.people {
                    ""
                } else {
                    " (no customer or courier)"
                };
                format!(
                    "order {}: {} × product {}{people}",
                    o.id, o.quantity, o.product_id
                )
            })
            .collect();
        let f_ = self.faults;
        write!(
            f,
            "{}: {}; {}; faults: {} republished, {} restarts, {} parked, {} catalog changes",
            self.name,
            products.join(", "),
            orders.join(", "),
            f_.republished,
            f_.restarts,
            f_.parked,
            f_.catalog_changes
        )
    }
}
