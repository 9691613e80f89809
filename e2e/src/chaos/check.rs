//! The invariants a chaos run checks once the mall is quiet, as pure functions of a
//! [`Snapshot`]: what the three REST APIs, the saga topic and the dead-letter topic say, plus
//! what the workload saw. Each check counts the items it looked at and lists its violations,
//! every one with the order and the events involved.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Check names, as printed in the report.
pub mod names {
    /// Every order (each 201, and every order orders lists) ends, with no pending cancel and
    /// no parked event it waits on.
    pub const TERMINAL: &str = "every order ends (OrderCompleted|OrderCancelled, no pending cancel, \
         no order stuck behind a parked event)";
    /// At most one of each effect per order, on the topic.
    pub const EXACTLY_ONCE: &str = "exactly-once effects per order (topic)";
    /// No two distinct events with the same (source, eventType, causationId).
    pub const NO_DOUBLE_APPLY: &str = "no event applied twice (source, type, causationId)";
    /// stock + reserved + delivered is conserved, and matches the orders.
    pub const STOCK: &str = "stock conserved per product";
    /// orders, products and delivery agree on every order.
    pub const AGREE: &str = "the three services agree on every order";
    /// No 5xx answer (other than /health).
    pub const NO_5XX: &str = "no HTTP 5xx (other than /health)";
    /// The DLT holds the injected poison only, parked by every group.
    pub const DLT: &str = "DLT: only the injected poison, parked by all three groups";
    /// /health answers 200 at the end.
    pub const HEALTH: &str = "every service (instance) /health answers 200 at the end";
    /// The REST lists and topics could be read.
    pub const READABLE: &str = "state readable (REST lists, products, topics)";
    /// Judged quiet: no outbox backlog, every partition read to its end by every service.
    pub const QUIET: &str = "quiet when read (outboxes empty, consumers at the topic's end)";
    /// The topic holds every accepted order's events, keyed and filled as the orders say.
    pub const COMPLETE: &str = "topic complete (every order's events; key, product, quantity)";
    /// The workload did enough for the checks to mean something.
    pub const WORKLOAD: &str = "workload ran (orders accepted, follow-ups applied)";
    /// A POST /orders retried with its `Idempotency-Key` placed one order, whatever happened to
    /// the attempts before.
    pub const PLACED_ONCE: &str = "each offer placed once (POST retried with its Idempotency-Key)";
    /// While two instances are paused (`--long-pauses`), the live orders instances answer
    /// POSTs about as fast as when no fault is on.
    pub const BESIDE_PAUSES: &str =
        "POSTs to live instances answered in their usual time while two are paused";
}

/// The event types whose effect must happen at most once per order.
pub const AT_MOST_ONCE: [&str; 8] = [
    "OrderPlaced",
    "StockDecreased",
    "StockIncreased",
    "DeliveryStarted",
    "DeliveryCompleted",
    "DeliveryCancelled",
    "OrderCompleted",
    "OrderCancelled",
];

fn int(v: &Value, name: &str) -> Result<i64, String> {
    v[name]
        .as_i64()
        .ok_or_else(|| format!("no integer {name:?} in {v}"))
}

fn text(v: &Value, name: &str) -> Result<String, String> {
    v[name]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no string {name:?} in {v}"))
}

/// A string or a number as text; `None` for null or absent.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An order as orders lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRow {
    /// Order id.
    pub id: i64,
    /// Product.
    pub product_id: i64,
    /// Units.
    pub quantity: i64,
    /// `OrderPlaced`, `OrderCompleted`, `OrderCancelled`.
    pub state: String,
    /// The delivery's state as orders knows it.
    pub delivery_state: Option<String>,
    /// A customer cancel waits for delivery's decision.
    pub cancel_requested: bool,
    /// Saga events of the order a service parked and nobody redrove or discarded.
    pub parked_events: usize,
    /// The customer's name: the workload names each offer's orders apart
    /// ([`super::workload::customer_name`]).
    pub customer_name: Option<String>,
}

impl OrderRow {
    /// From orders' JSON.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        Ok(OrderRow {
            id: int(v, "id")?,
            product_id: int(v, "productId")?,
            quantity: int(v, "quantity")?,
            state: text(v, "state")?,
            delivery_state: v["deliveryState"].as_str().map(str::to_owned),
            cancel_requested: v["cancelRequested"].as_bool().unwrap_or(false),
            parked_events: v["parkedEvents"].as_array().map_or(0, Vec::len),
            customer_name: v["customerName"].as_str().map(str::to_owned),
        })
    }
}

/// A stock reservation as products lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservationRow {
    /// The order.
    pub order_id: i64,
    /// The product.
    pub product_id: i64,
    /// Units.
    pub quantity: i64,
    /// `Reserved`, `Released`, `Rejected`, `Delivered`, `Voided`.
    pub state: String,
}

impl ReservationRow {
    /// From products' JSON.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        Ok(ReservationRow {
            order_id: int(v, "orderId")?,
            product_id: int(v, "productId")?,
            quantity: int(v, "quantity")?,
            state: text(v, "state")?,
        })
    }
}

/// A delivery as delivery lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    /// Delivery id.
    pub id: i64,
    /// The order.
    pub order_id: i64,
    /// The product, if listed.
    pub product_id: Option<i64>,
    /// Units, if listed.
    pub quantity: Option<i64>,
    /// `DeliveryStarted`, `DeliveryCompleted`, `DeliveryCancelled`.
    pub delivery_state: String,
}

impl DeliveryRow {
    /// From delivery's JSON.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        Ok(DeliveryRow {
            id: int(v, "id")?,
            order_id: int(v, "orderId")?,
            product_id: v["productId"].as_i64(),
            quantity: v["quantity"].as_i64(),
            delivery_state: text(v, "deliveryState")?,
        })
    }
}

/// A product as products shows it, with the stock it was created with.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductRow {
    /// Product id.
    pub id: i64,
    /// Stock at creation.
    pub initial: i64,
    /// Units on the shelf.
    pub stock: i64,
    /// Units reserved for confirmed orders, not delivered.
    pub reserved: i64,
    /// Units delivered.
    pub delivered: i64,
}

impl ProductRow {
    /// From products' JSON and the stock it was created with.
    pub fn from_json(v: &Value, initial: i64) -> Result<Self, String> {
        Ok(ProductRow {
            id: int(v, "id")?,
            initial,
            stock: int(v, "stock")?,
            reserved: int(v, "reserved")?,
            delivered: int(v, "delivered")?,
        })
    }
}

/// One saga event read from the topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicEvent {
    /// `eventType`.
    pub event_type: String,
    /// `eventId`.
    pub event_id: String,
    /// `source`.
    pub source: String,
    /// `correlationId` (the order id), if any.
    pub correlation_id: Option<String>,
    /// `causationId`, if any.
    pub causation_id: Option<String>,
    /// The Kafka key.
    pub key: Option<String>,
    /// `productId`, if any.
    pub product_id: Option<i64>,
    /// `quantity`, if any.
    pub quantity: Option<i64>,
}

impl TopicEvent {
    /// The event in a topic message, or `None` if it is not one (poison, garbage).
    pub fn from_message(key: Option<&str>, v: &Value) -> Option<Self> {
        Some(TopicEvent {
            event_type: v["eventType"].as_str()?.to_owned(),
            event_id: v["eventId"].as_str()?.to_owned(),
            source: v["source"].as_str().unwrap_or("?").to_owned(),
            correlation_id: id_text(&v["correlationId"]),
            causation_id: id_text(&v["causationId"]),
            key: key.map(str::to_owned),
            product_id: v["productId"].as_i64(),
            quantity: v["quantity"].as_i64(),
        })
    }

    /// `StockDecreased by products 0eb2a7c1 ← a93df157`.
    pub fn short(&self) -> String {
        let mut s = format!(
            "{} by {} {}",
            self.event_type,
            self.source,
            short_id(&self.event_id)
        );
        if let Some(c) = &self.causation_id {
            s.push_str(&format!(" ← {}", short_id(c)));
        }
        s
    }
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// One record of the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    /// The parked message's key (the letter's `key` field).
    pub key: Option<String>,
    /// Who parked it.
    pub consumer_group: Option<String>,
    /// Why.
    pub reason: String,
    /// The parked payload's size.
    pub payload_bytes: Option<u64>,
}

impl DeadLetterRow {
    /// From a dead letter's JSON.
    pub fn from_json(v: &Value) -> Self {
        DeadLetterRow {
            key: v["key"].as_str().map(str::to_owned),
            consumer_group: v["consumerGroup"].as_str().map(str::to_owned),
            reason: v["reason"].as_str().unwrap_or_default().to_owned(),
            payload_bytes: v["payloadBytes"].as_u64(),
        }
    }
}

/// Everything the checks look at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Ids of every order a POST answered 201 for.
    pub accepted: BTreeSet<i64>,
    /// orders' `GET /orders` (all pages).
    pub orders: Vec<OrderRow>,
    /// products' `GET /reservations` (all pages).
    pub reservations: Vec<ReservationRow>,
    /// delivery's `GET /deliveries` (all pages).
    pub deliveries: Vec<DeliveryRow>,
    /// The products the run created.
    pub products: Vec<ProductRow>,
    /// Saga events on the topic.
    pub events: Vec<TopicEvent>,
    /// Records of `<topic>.DLT`.
    pub dead_letters: Vec<DeadLetterRow>,
    /// Keys of the poison messages injected (and acknowledged by the broker).
    pub poison_keys: Vec<String>,
    /// HTTP requests made by the run (other than /health).
    pub requests: u64,
    /// Every 5xx seen (other than /health): `METHOD url → status body`.
    pub http_5xx: Vec<String>,
    /// `/health` of each service at the end: status, or why there was none.
    pub health: Vec<(String, Result<u16, String>)>,
    /// How many sources were read.
    pub sources: usize,
    /// Sources that could not be read, and why.
    pub read_errors: Vec<String>,
    /// Why the mall was not quiet when it was read (`None`: it was, see [`crate::quiet`]).
    pub not_quiet: Option<String>,
    /// Orders the workload was to offer.
    pub planned_orders: u64,
    /// Orders it offered (POSTs sent).
    pub offered: u64,
    /// Offers given up: no answer, or still 503/429, after retrying for a minute.
    pub given_up: u64,
    /// Follow-ups (cancels, completions) a service accepted.
    pub follow_ups_applied: u64,
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The order, when it is about one.
    pub order: Option<i64>,
    /// What is wrong.
    pub what: String,
    /// The events involved (short form).
    pub events: Vec<String>,
}

impl Violation {
    /// A violation about the run as a whole, not one order.
    pub fn general(what: impl Into<String>) -> Self {
        Violation {
            order: None,
            what: what.into(),
            events: Vec::new(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.order {
            Some(id) => write!(f, "order {id}: {}", self.what)?,
            None => write!(f, "{}", self.what)?,
        }
        for e in &self.events {
            write!(f, "\n        {e}")?;
        }
        Ok(())
    }
}

/// One invariant's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    /// Its name.
    pub name: &'static str,
    /// How many items it looked at.
    pub items: usize,
    /// What broke.
    pub violations: Vec<Violation>,
}

impl CheckResult {
    /// True when nothing broke.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The snapshot, indexed.
struct Index<'a> {
    s: &'a Snapshot,
    orders: BTreeMap<i64, &'a OrderRow>,
    events: BTreeMap<String, Vec<&'a TopicEvent>>,
    reservations: BTreeMap<i64, Vec<&'a ReservationRow>>,
    deliveries: BTreeMap<i64, Vec<&'a DeliveryRow>>,
}

impl<'a> Index<'a> {
    /// Every order the checks judge: those the workload saw accepted and those orders lists.
    fn order_ids(&self) -> BTreeSet<i64> {
        self.s
            .accepted
            .iter()
            .chain(self.orders.keys())
            .copied()
            .collect()
    }

    fn new(s: &'a Snapshot) -> Self {
        let mut events: BTreeMap<String, Vec<&TopicEvent>> = BTreeMap::new();
        for e in &s.events {
            if let Some(c) = &e.correlation_id {
                events.entry(c.clone()).or_default().push(e);
            }
        }
        let mut reservations: BTreeMap<i64, Vec<&ReservationRow>> = BTreeMap::new();
        for r in &s.reservations {
            reservations.entry(r.order_id).or_default().push(r);
        }
        let mut deliveries: BTreeMap<i64, Vec<&DeliveryRow>> = BTreeMap::new();
        for d in &s.deliveries {
            deliveries.entry(d.order_id).or_default().push(d);
        }
        Index {
            s,
            orders: s.orders.iter().map(|o| (o.id, o)).collect(),
            events,
            reservations,
            deliveries,
        }
    }

    /// The order's events, short, in topic order.
    fn events_of(&self, order: i64) -> Vec<String> {
        self.events
            .get(&order.to_string())
            .map(|l| l.iter().map(|e| e.short()).collect())
            .unwrap_or_default()
    }

    fn violation(&self, order: i64, what: String) -> Violation {
        Violation {
            order: Some(order),
            what,
            events: self.events_of(order),
        }
    }

    /// Distinct event ids of `event_type` for this correlation id.
    fn distinct(&self, correlation: &str, event_type: &str) -> usize {
        self.events
            .get(correlation)
            .map(|l| {
                l.iter()
                    .filter(|e| e.event_type == event_type)
                    .map(|e| e.event_id.as_str())
                    .collect::<BTreeSet<_>>()
                    .len()
            })
            .unwrap_or(0)
    }

    fn reservation(&self, order: i64) -> Option<&'a ReservationRow> {
        self.reservations
            .get(&order)
            .and_then(|l| l.first().copied())
    }

    fn delivery(&self, order: i64) -> Option<&'a DeliveryRow> {
        self.deliveries.get(&order).and_then(|l| l.first().copied())
    }
}

/// Runs every invariant on the snapshot.
pub fn check_all(s: &Snapshot) -> Vec<CheckResult> {
    let ix = Index::new(s);
    vec![
        readable(s),
        quiet(s),
        workload(s),
        placed_once(s),
        complete(&ix),
        terminal(&ix),
        exactly_once(&ix),
        no_double_apply(&ix),
        stock(&ix),
        agree(&ix),
        no_5xx(s),
        dead_letters(s),
        health(s),
    ]
}

fn readable(s: &Snapshot) -> CheckResult {
    CheckResult {
        name: names::READABLE,
        items: s.sources,
        violations: s
            .read_errors
            .iter()
            .map(|e| Violation::general(e.clone()))
            .collect(),
    }
}

/// The state was read from a quiet mall: a copy or an effect still on its way would otherwise
/// be judged missing, or a duplicate still to come never seen.
fn quiet(s: &Snapshot) -> CheckResult {
    CheckResult {
        name: names::QUIET,
        items: 1,
        violations: s
            .not_quiet
            .iter()
            .map(|why| Violation::general(format!("not quiet: {why}")))
            .collect(),
    }
}

/// The checks mean something only on data: every planned order offered, at least 95 % of
/// them accepted (each POST is retried through kills and pauses, so few are lost), none given
/// up, and follow-ups applied for at least a tenth of them.
fn workload(s: &Snapshot) -> CheckResult {
    let mut violations = Vec::new();
    let mut fail = |what: String| violations.push(Violation::general(what));
    if s.offered < s.planned_orders {
        fail(format!(
            "{} of {} orders offered",
            s.offered, s.planned_orders
        ));
    }
    if s.given_up > 0 {
        fail(format!(
            "{} orders given up: orders did not answer a POST (or kept answering 503/429) \
             for a minute",
            s.given_up
        ));
    }
    let accepted = s.accepted.len() as u64;
    let least = (s.planned_orders * 95 / 100).max(1);
    if accepted < least {
        fail(format!(
            "{accepted} orders accepted of {}; at least {least} expected",
            s.planned_orders
        ));
    }
    let least = (accepted / 10).max(1);
    if s.follow_ups_applied < least {
        fail(format!(
            "{} follow-ups applied for {accepted} orders; at least {least} expected",
            s.follow_ups_applied
        ));
    }
    CheckResult {
        name: names::WORKLOAD,
        items: usize::try_from(s.planned_orders).unwrap_or(usize::MAX),
        violations,
    }
}

/// Each offer's POST carried one `Idempotency-Key` through all its attempts; orders lists at
/// most one order per offer (the workload names each offer's customer apart). Two orders of
/// one offer mean a retry after a kill or a pause placed it again.
fn placed_once(s: &Snapshot) -> CheckResult {
    let mut by_offer: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for o in &s.orders {
        if let Some(name) = o.customer_name.as_deref() {
            by_offer.entry(name).or_default().push(o.id);
        }
    }
    let violations = by_offer
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(name, ids)| Violation {
            order: ids.first().copied(),
            what: format!("{name:?} was placed {} times: orders {ids:?}", ids.len()),
            events: Vec::new(),
        })
        .collect();
    CheckResult {
        name: names::PLACED_ONCE,
        items: by_offer.len(),
        violations,
    }
}

/// The topic is complete and right: every order (accepted or listed) has its OrderPlaced; a
/// completed one its StockDecreased, DeliveryStarted and OrderCompleted; a cancelled one its
/// OrderCancelled. Every event of an order is keyed by the order id, and the product and
/// quantity it names are the order's.
fn complete(ix: &Index) -> CheckResult {
    let ids = ix.order_ids();
    let mut violations = Vec::new();
    for id in &ids {
        let c = id.to_string();
        let mut problems = Vec::new();
        let mut needed = vec!["OrderPlaced"];
        match ix.orders.get(id).map(|o| o.state.as_str()) {
            Some("OrderCompleted") => {
                needed.extend(["StockDecreased", "DeliveryStarted", "OrderCompleted"]);
            }
            Some("OrderCancelled") => needed.push("OrderCancelled"),
            _ => {}
        }
        let missing: Vec<&str> = needed
            .into_iter()
            .filter(|t| ix.distinct(&c, t) == 0)
            .collect();
        if !missing.is_empty() {
            problems.push(format!("no {} on the topic", missing.join(", ")));
        }
        for e in ix.events.get(&c).into_iter().flatten() {
            if e.key.as_deref() != Some(c.as_str()) {
                problems.push(format!(
                    "{} is keyed {}",
                    e.short(),
                    e.key.as_deref().unwrap_or("(none)")
                ));
            }
            let Some(o) = ix.orders.get(id) else {
                continue;
            };
            if e.product_id.is_some_and(|p| p != o.product_id) {
                problems.push(format!(
                    "{} names product {:?}, the order {}",
                    e.short(),
                    e.product_id,
                    o.product_id
                ));
            }
            if e.quantity.is_some_and(|q| q != o.quantity) {
                problems.push(format!(
                    "{} names quantity {:?}, the order {}",
                    e.short(),
                    e.quantity,
                    o.quantity
                ));
            }
        }
        if !problems.is_empty() {
            violations.push(ix.violation(*id, problems.join("; ")));
        }
    }
    if ids.is_empty() {
        violations.push(Violation::general("no orders at all: nothing to check"));
    }
    CheckResult {
        name: names::COMPLETE,
        items: ids.len(),
        violations,
    }
}

/// Invariant 1: Every accepted order (and every order orders lists) is OrderCompleted or OrderCancelled,
/// with no cancel pending.
fn terminal(ix: &Index) -> CheckResult {
    let ids = ix.order_ids();
    let mut violations = Vec::new();
    for id in &ids {
        let note = if ix.s.accepted.contains(id) {
            ""
        } else {
            " (no 201 seen: its POST failed on the client side but was accepted)"
        };
        match ix.orders.get(id) {
            None => violations.push(ix.violation(
                *id,
                "answered 201 to POST /orders but is not in GET /orders".into(),
            )),
            Some(o) if o.state != "OrderCompleted" && o.state != "OrderCancelled" => {
                violations.push(ix.violation(*id, format!("is still {}{note}", o.state)))
            }
            Some(o) if o.cancel_requested => violations.push(ix.violation(
                *id,
                format!(
                    "is {} with a cancel still pending (cancelRequested){note}",
                    o.state
                ),
            )),
            Some(o) if o.parked_events > 0 => violations.push(ix.violation(
                *id,
                format!(
                    "is {} but waits on {} parked event(s) (parkedEvents){note}",
                    o.state, o.parked_events
                ),
            )),
            Some(_) => {}
        }
    }
    CheckResult {
        name: names::TERMINAL,
        items: ids.len(),
        violations,
    }
}

/// Invariant 2: At most one of each effect per order; a StockIncreased only for a cancelled order that
/// had a StockDecreased; no DeliveryCompleted for a cancelled order; products decides once.
fn exactly_once(ix: &Index) -> CheckResult {
    let mut correlations: BTreeSet<String> = ix.events.keys().cloned().collect();
    correlations.extend(ix.orders.keys().map(i64::to_string));
    let mut violations = Vec::new();
    for c in &correlations {
        let mut problems = Vec::new();
        for t in AT_MOST_ONCE {
            let n = ix.distinct(c, t);
            if n > 1 {
                problems.push(format!("{n} distinct {t}"));
            }
        }
        let decreased = ix.distinct(c, "StockDecreased");
        let increased = ix.distinct(c, "StockIncreased");
        let cancelled = ix.distinct(c, "OrderCancelled");
        if increased > 0 && decreased == 0 {
            problems.push("StockIncreased without a StockDecreased".into());
        }
        if increased > 0 && cancelled == 0 {
            problems.push("StockIncreased for an order that is not cancelled".into());
        }
        let listed = c.parse::<i64>().ok().and_then(|id| ix.orders.get(&id));
        if let Some(o) = listed
            && increased > 0
            && o.state != "OrderCancelled"
        {
            problems.push(format!("StockIncreased but orders says {}", o.state));
        }
        if cancelled > 0 && ix.distinct(c, "DeliveryCompleted") > 0 {
            problems.push("DeliveryCompleted for a cancelled order".into());
        }
        if decreased > 0 && ix.distinct(c, "ProductOutOfStock") > 0 {
            problems.push("both StockDecreased and ProductOutOfStock".into());
        }
        if !problems.is_empty() {
            let events = ix
                .events
                .get(c)
                .map(|l| l.iter().map(|e| e.short()).collect())
                .unwrap_or_default();
            violations.push(Violation {
                order: c.parse().ok(),
                what: if c.parse::<i64>().is_ok() {
                    problems.join("; ")
                } else {
                    format!("correlationId {c:?}: {}", problems.join("; "))
                },
                events,
            });
        }
    }
    CheckResult {
        name: names::EXACTLY_ONCE,
        items: correlations.len(),
        violations,
    }
}

/// Invariant 2b: No two distinct events with the same (source, eventType, causationId): an event
/// applied twice by the same service.
fn no_double_apply(ix: &Index) -> CheckResult {
    let mut by_cause: BTreeMap<(&str, &str, &str), Vec<&TopicEvent>> = BTreeMap::new();
    let mut items = 0;
    for e in &ix.s.events {
        if let Some(cause) = &e.causation_id {
            items += 1;
            let list = by_cause
                .entry((e.source.as_str(), e.event_type.as_str(), cause.as_str()))
                .or_default();
            if !list.iter().any(|x| x.event_id == e.event_id) {
                list.push(e);
            }
        }
    }
    let mut violations = Vec::new();
    for ((source, event_type, cause), list) in by_cause {
        if list.len() > 1 {
            let order = list
                .first()
                .and_then(|e| e.correlation_id.as_ref())
                .and_then(|c| c.parse().ok());
            let mut events: Vec<String> = list.iter().map(|e| e.short()).collect();
            if let Some(o) = order {
                events.push("the order's events:".into());
                events.extend(ix.events_of(o).into_iter().map(|e| format!("  {e}")));
            }
            violations.push(Violation {
                order,
                what: format!(
                    "{} distinct {event_type} by {source} caused by the same event {}",
                    list.len(),
                    short_id(cause)
                ),
                events,
            });
        }
    }
    CheckResult {
        name: names::NO_DOUBLE_APPLY,
        items,
        violations,
    }
}

/// Invariant 3: Per product: stock + reserved + delivered = initial; reserved + delivered = units of its
/// OrderCompleted orders; delivered = units of its orders whose delivery is completed.
fn stock(ix: &Index) -> CheckResult {
    let mut completed: HashMap<i64, i64> = HashMap::new();
    for o in ix.orders.values() {
        if o.state == "OrderCompleted" {
            *completed.entry(o.product_id).or_default() += o.quantity;
        }
    }
    let mut delivered: HashMap<i64, i64> = HashMap::new();
    for d in &ix.s.deliveries {
        if d.delivery_state != "DeliveryCompleted" {
            continue;
        }
        let (product, quantity) = match ix.orders.get(&d.order_id) {
            Some(o) => (Some(o.product_id), Some(o.quantity)),
            None => (d.product_id, d.quantity),
        };
        if let (Some(p), Some(q)) = (product, quantity) {
            *delivered.entry(p).or_default() += q;
        }
    }
    let mut violations = Vec::new();
    for p in &ix.s.products {
        let mut problems = Vec::new();
        let total = p.stock + p.reserved + p.delivered;
        if total != p.initial {
            problems.push(format!(
                "stock {} + reserved {} + delivered {} = {total}, created with {}",
                p.stock, p.reserved, p.delivered, p.initial
            ));
        }
        if p.stock < 0 || p.reserved < 0 || p.delivered < 0 {
            problems.push("a negative count".into());
        }
        let want = completed.get(&p.id).copied().unwrap_or(0);
        if p.reserved + p.delivered != want {
            problems.push(format!(
                "reserved {} + delivered {} = {}, but its OrderCompleted orders hold {want}",
                p.reserved,
                p.delivered,
                p.reserved + p.delivered
            ));
        }
        let want = delivered.get(&p.id).copied().unwrap_or(0);
        if p.delivered != want {
            problems.push(format!(
                "delivered {}, but its DeliveryCompleted deliveries hold {want}",
                p.delivered
            ));
        }
        if !problems.is_empty() {
            violations.push(Violation::general(format!(
                "product {}: {}",
                p.id,
                problems.join("; ")
            )));
        }
    }
    CheckResult {
        name: names::STOCK,
        items: ix.s.products.len(),
        violations,
    }
}

/// Invariant 4: The three services agree on every order.
fn agree(ix: &Index) -> CheckResult {
    let mut violations = Vec::new();
    for (id, o) in &ix.orders {
        let mut problems = Vec::new();
        let reservations = ix.reservations.get(id).map(Vec::len).unwrap_or(0);
        if reservations > 1 {
            problems.push(format!("{reservations} reservations"));
        }
        let deliveries = ix.deliveries.get(id).map(Vec::len).unwrap_or(0);
        if deliveries > 1 {
            problems.push(format!("{deliveries} deliveries"));
        }
        let r = ix.reservation(*id);
        let d = ix.delivery(*id);
        let r_state = r.map(|r| r.state.as_str());
        let d_state = d.map(|d| d.delivery_state.as_str());
        if let Some(r) = r
            && (r.product_id != o.product_id || r.quantity != o.quantity)
        {
            problems.push(format!(
                "reservation is {} × product {}, the order {} × product {}",
                r.quantity, r.product_id, o.quantity, o.product_id
            ));
        }
        match o.state.as_str() {
            "OrderCompleted" => {
                if !matches!(r_state, Some("Reserved" | "Delivered")) {
                    problems.push(format!(
                        "OrderCompleted but reservation is {}",
                        r_state.unwrap_or("absent")
                    ));
                }
                if !matches!(d_state, Some("DeliveryStarted" | "DeliveryCompleted")) {
                    problems.push(format!(
                        "OrderCompleted but delivery is {}",
                        d_state.unwrap_or("absent")
                    ));
                }
                if d_state.is_some() && o.delivery_state.as_deref() != d_state {
                    problems.push(format!(
                        "orders says deliveryState {}, delivery says {}",
                        o.delivery_state.as_deref().unwrap_or("null"),
                        d_state.unwrap_or("absent")
                    ));
                }
                if (r_state == Some("Delivered")) != (d_state == Some("DeliveryCompleted")) {
                    problems.push(format!(
                        "reservation {} but delivery {}",
                        r_state.unwrap_or("absent"),
                        d_state.unwrap_or("absent")
                    ));
                }
            }
            "OrderCancelled" => {
                if !matches!(r_state, None | Some("Released" | "Rejected" | "Voided")) {
                    problems.push(format!(
                        "OrderCancelled but reservation is {}",
                        r_state.unwrap_or("absent")
                    ));
                }
                if !matches!(d_state, None | Some("DeliveryCancelled")) {
                    problems.push(format!(
                        "OrderCancelled but delivery is {}",
                        d_state.unwrap_or("absent")
                    ));
                }
            }
            _ => {} // not terminal: the terminal check reports it
        }
        if !problems.is_empty() {
            violations.push(ix.violation(*id, problems.join("; ")));
        }
    }
    for id in ix.reservations.keys() {
        if !ix.orders.contains_key(id) {
            violations.push(ix.violation(
                *id,
                "products has a reservation for an order orders does not list".into(),
            ));
        }
    }
    for id in ix.deliveries.keys() {
        if !ix.orders.contains_key(id) {
            violations.push(ix.violation(
                *id,
                "delivery has a delivery for an order orders does not list".into(),
            ));
        }
    }
    CheckResult {
        name: names::AGREE,
        items: ix.orders.len(),
        violations,
    }
}

/// Invariant 5a: no 5xx.
fn no_5xx(s: &Snapshot) -> CheckResult {
    CheckResult {
        name: names::NO_5XX,
        items: usize::try_from(s.requests).unwrap_or(usize::MAX),
        violations: s
            .http_5xx
            .iter()
            .map(|e| Violation::general(e.clone()))
            .collect(),
    }
}

/// Invariant 5b: Nothing on the DLT but the injected poison, and each poison parked by each group.
fn dead_letters(s: &Snapshot) -> CheckResult {
    let mut violations = Vec::new();
    for l in &s.dead_letters {
        let poison = l.key.as_deref().is_some_and(|k| k.starts_with("poison-"));
        if !poison {
            violations.push(Violation {
                order: l.key.as_deref().and_then(|k| k.parse().ok()),
                what: format!(
                    "parked by {} with key {}: {}",
                    l.consumer_group.as_deref().unwrap_or("?"),
                    l.key.as_deref().unwrap_or("(none)"),
                    l.reason
                ),
                events: Vec::new(),
            });
        }
    }
    for key in &s.poison_keys {
        for group in crate::stack::SERVICES {
            let parked = s.dead_letters.iter().any(|l| {
                l.key.as_deref() == Some(key.as_str()) && l.consumer_group.as_deref() == Some(group)
            });
            if !parked {
                violations.push(Violation::general(format!(
                    "{key} was not parked by {group}"
                )));
            }
        }
    }
    CheckResult {
        name: names::DLT,
        items: s.dead_letters.len() + s.poison_keys.len() * crate::stack::SERVICES.len(),
        violations,
    }
}

/// Invariant 6: /health 200 everywhere.
fn health(s: &Snapshot) -> CheckResult {
    CheckResult {
        name: names::HEALTH,
        items: s.health.len(),
        violations: s
            .health
            .iter()
            .filter_map(|(service, status)| match status {
                Ok(200) => None,
                Ok(code) => Some(format!("{service}/health answered {code}")),
                Err(e) => Some(format!("{service}/health: {e}")),
            })
            .map(Violation::general)
            .collect(),
    }
}

/// A POST to a live instance beside a pause may be this many times slower at the 99th
/// percentile than outside every fault ...
pub const BESIDE_PAUSES_FACTOR: f64 = 3.0;
/// ... or take this long, whichever is more: a usual p99 of a few milliseconds times any
/// factor would fail on a scheduler's hiccup, while a write waiting on a paused instance's
/// lock waits seconds (`PG_LOCK_TIMEOUT_MS`).
pub const BESIDE_PAUSES_FLOOR_MS: f64 = 1000.0;

/// POST /orders attempts to instances that stayed live while two instances were paused
/// (`beside`: ms until the answer, `None` for none within the client's timeout), judged against
/// the attempts made while no fault was on (`usual`, ms): every one answered, the 99th
/// percentile within [`BESIDE_PAUSES_FACTOR`] × the usual one or [`BESIDE_PAUSES_FLOOR_MS`].
pub fn beside_pauses(beside: &[Option<f64>], usual: &[f64]) -> CheckResult {
    use crate::bench::stats::Spread;
    let mut violations = Vec::new();
    let mut fail = |what: String| violations.push(Violation::general(what));
    let unanswered = beside.iter().filter(|t| t.is_none()).count();
    if unanswered > 0 {
        fail(format!(
            "{unanswered} POSTs to a live instance got no answer while two instances were paused"
        ));
    }
    let answered: Vec<f64> = beside.iter().flatten().copied().collect();
    if answered.is_empty() || usual.is_empty() {
        fail(format!(
            "nothing to compare: {} POSTs answered beside the pauses, {} outside every fault",
            answered.len(),
            usual.len()
        ));
    } else {
        let (during, normal) = (Spread::of(answered), Spread::of(usual.to_vec()));
        let bound = (BESIDE_PAUSES_FACTOR * normal.p99).max(BESIDE_PAUSES_FLOOR_MS);
        if during.p99 > bound {
            fail(format!(
                "beside the pauses p50 {:.0} ms, p99 {:.0} ms (max {:.0}); usual p50 {:.0} ms, \
                 p99 {:.0} ms; p99 allowed {bound:.0} ms",
                during.p50, during.p99, during.max, normal.p50, normal.p99
            ));
        }
    }
    CheckResult {
        name: names::BESIDE_PAUSES,
        items: beside.len(),
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// POSTs beside a pause pass at their usual speed and within the floor; one live instance
    /// stalled behind a paused one's lock (seconds), an unanswered POST or no data fail.
    #[test]
    fn posts_beside_pauses_must_keep_their_usual_time() {
        let usual: Vec<f64> = (0..200).map(|i| 10.0 + f64::from(i % 20)).collect();
        let quick: Vec<Option<f64>> = (0..200).map(|i| Some(12.0 + f64::from(i % 30))).collect();
        assert!(beside_pauses(&quick, &usual).passed());
        let mut stalled = quick.clone();
        for t in stalled.iter_mut().take(10) {
            *t = Some(5_000.0);
        }
        let r = beside_pauses(&stalled, &usual);
        assert!(!r.passed() && r.violations[0].what.contains("p99"), "{r:?}");
        let mut lost = quick.clone();
        lost[0] = None;
        assert!(!beside_pauses(&lost, &usual).passed());
        assert!(!beside_pauses(&[], &usual).passed());
        assert!(!beside_pauses(&quick, &[]).passed());
    }

    fn ev(order: i64, t: &str, source: &str, id: &str, cause: Option<&str>) -> TopicEvent {
        TopicEvent {
            event_type: t.into(),
            event_id: id.into(),
            source: source.into(),
            correlation_id: Some(order.to_string()),
            causation_id: cause.map(str::to_owned),
            key: Some(order.to_string()),
            product_id: Some(1),
            quantity: None,
        }
    }

    fn order(id: i64, quantity: i64, state: &str, delivery: Option<&str>) -> OrderRow {
        OrderRow {
            id,
            product_id: 1,
            quantity,
            state: state.into(),
            delivery_state: delivery.map(str::to_owned),
            cancel_requested: false,
            parked_events: 0,
            customer_name: Some(format!("Chaos #{id}")),
        }
    }

    fn reservation(order: i64, quantity: i64, state: &str) -> ReservationRow {
        ReservationRow {
            order_id: order,
            product_id: 1,
            quantity,
            state: state.into(),
        }
    }

    fn delivery(id: i64, order: i64, state: &str) -> DeliveryRow {
        DeliveryRow {
            id,
            order_id: order,
            product_id: Some(1),
            quantity: None,
            delivery_state: state.into(),
        }
    }

    /// A consistent mall: order 1 delivered (2 units), order 2 confirmed (1 unit), order 3 out
    /// of stock, order 4 cancelled by the customer after confirmation (1 unit, restocked).
    fn good() -> Snapshot {
        let events = vec![
            ev(1, "OrderPlaced", "orders", "p1", None),
            ev(1, "StockDecreased", "products", "s1", Some("p1")),
            ev(1, "DeliveryStarted", "delivery", "d1", Some("p1")),
            ev(1, "OrderCompleted", "orders", "c1", Some("d1")),
            ev(1, "DeliveryCompleted", "delivery", "x1", None),
            ev(2, "OrderPlaced", "orders", "p2", None),
            ev(2, "StockDecreased", "products", "s2", Some("p2")),
            ev(2, "DeliveryStarted", "delivery", "d2", Some("p2")),
            ev(2, "OrderCompleted", "orders", "c2", Some("s2")),
            ev(3, "OrderPlaced", "orders", "p3", None),
            ev(3, "ProductOutOfStock", "products", "o3", Some("p3")),
            ev(3, "DeliveryStarted", "delivery", "d3", Some("p3")),
            ev(3, "OrderCancelled", "orders", "k3", Some("o3")),
            ev(3, "DeliveryCancelled", "delivery", "y3", Some("k3")),
            ev(4, "OrderPlaced", "orders", "p4", None),
            ev(4, "StockDecreased", "products", "s4", Some("p4")),
            ev(4, "DeliveryStarted", "delivery", "d4", Some("p4")),
            ev(4, "OrderCompleted", "orders", "c4", Some("d4")),
            ev(4, "OrderCancelRequested", "orders", "r4", None),
            ev(4, "DeliveryCancelled", "delivery", "y4", Some("r4")),
            ev(4, "OrderCancelled", "orders", "k4", Some("y4")),
            ev(4, "StockIncreased", "products", "i4", Some("y4")),
        ];
        Snapshot {
            accepted: [1, 2, 3, 4].into(),
            orders: vec![
                order(1, 2, "OrderCompleted", Some("DeliveryCompleted")),
                order(2, 1, "OrderCompleted", Some("DeliveryStarted")),
                order(3, 3, "OrderCancelled", Some("DeliveryCancelled")),
                order(4, 1, "OrderCancelled", Some("DeliveryCancelled")),
            ],
            reservations: vec![
                reservation(1, 2, "Delivered"),
                reservation(2, 1, "Reserved"),
                reservation(3, 3, "Rejected"),
                reservation(4, 1, "Released"),
            ],
            deliveries: vec![
                delivery(11, 1, "DeliveryCompleted"),
                delivery(12, 2, "DeliveryStarted"),
                delivery(13, 3, "DeliveryCancelled"),
                delivery(14, 4, "DeliveryCancelled"),
            ],
            products: vec![ProductRow {
                id: 1,
                initial: 10,
                stock: 7,
                reserved: 1,
                delivered: 2,
            }],
            events,
            dead_letters: ["orders", "products", "delivery"]
                .iter()
                .map(|g| DeadLetterRow {
                    key: Some("poison-1".into()),
                    consumer_group: Some((*g).into()),
                    reason: "not JSON".into(),
                    payload_bytes: Some(10),
                })
                .collect(),
            poison_keys: vec!["poison-1".into()],
            requests: 20,
            http_5xx: Vec::new(),
            health: ["orders", "products", "delivery"]
                .iter()
                .map(|s| ((*s).to_owned(), Ok(200)))
                .collect(),
            sources: 5,
            read_errors: Vec::new(),
            not_quiet: None,
            planned_orders: 4,
            offered: 4,
            given_up: 0,
            follow_ups_applied: 1,
        }
    }

    fn result(s: &Snapshot, name: &str) -> CheckResult {
        check_all(s)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    /// The named check fails on `s`, and every other check passes.
    fn only_fails(s: &Snapshot, name: &str) -> Vec<Violation> {
        for c in check_all(s) {
            if c.name == name {
                assert!(!c.passed(), "{name} should fail");
            } else {
                assert!(c.passed(), "{} should pass: {:?}", c.name, c.violations);
            }
        }
        result(s, name).violations
    }

    #[test]
    fn a_consistent_mall_passes_everything() {
        let s = good();
        for c in check_all(&s) {
            assert!(c.passed(), "{}: {:?}", c.name, c.violations);
            assert!(c.items > 0, "{} looked at nothing", c.name);
        }
        assert_eq!(result(&s, names::TERMINAL).items, 4);
        assert_eq!(result(&s, names::DLT).items, 6);
    }

    #[test]
    fn a_redelivered_copy_is_not_a_second_effect() {
        let mut s = good();
        let copy = s.events[1].clone();
        s.events.push(copy);
        assert!(check_all(&s).iter().all(CheckResult::passed));
    }

    #[test]
    fn terminal_fails_on_a_pending_order() {
        let mut s = good();
        s.orders[1].state = "OrderPlaced".into();
        // orders did not complete it, so products and delivery still agree with nothing
        // (agreement skips non-terminal orders), but stock no longer matches the orders.
        let v = result(&s, names::TERMINAL).violations;
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].order, Some(2));
        assert!(v[0].what.contains("still OrderPlaced"));
        assert!(
            v[0].events
                .iter()
                .any(|e| e.starts_with("StockDecreased by products s2"))
        );
    }

    #[test]
    fn terminal_fails_on_a_pending_cancel_and_on_a_lost_order() {
        let mut s = good();
        s.orders[1].cancel_requested = true;
        let v = only_fails(&s, names::TERMINAL);
        assert!(v[0].what.contains("cancel still pending"));

        let mut s = good();
        s.orders[0].parked_events = 1;
        let v = only_fails(&s, names::TERMINAL);
        assert!(v[0].what.contains("parked event"), "{}", v[0].what);

        let mut s = good();
        s.accepted.insert(99);
        s.events.push(ev(99, "OrderPlaced", "orders", "p99", None));
        let v = only_fails(&s, names::TERMINAL);
        assert_eq!(v[0].order, Some(99));
        assert!(v[0].what.contains("not in GET /orders"));
    }

    #[test]
    fn exactly_once_fails_on_a_second_stock_decrease() {
        let mut s = good();
        s.events.push(ev(
            2,
            "StockDecreased",
            "products",
            "s2-again",
            Some("p2-copy"),
        ));
        let v = only_fails(&s, names::EXACTLY_ONCE);
        assert_eq!(v[0].order, Some(2));
        assert!(v[0].what.contains("2 distinct StockDecreased"));
        assert!(v[0].events.iter().any(|e| e.contains("s2-again")));
    }

    #[test]
    fn exactly_once_fails_on_a_restock_of_a_live_order() {
        let mut s = good();
        s.events
            .push(ev(2, "StockIncreased", "products", "i2", Some("whatever")));
        let v = result(&s, names::EXACTLY_ONCE).violations;
        assert_eq!(v.len(), 1);
        assert!(v[0].what.contains("not cancelled"));
        assert!(v[0].what.contains("orders says OrderCompleted"));

        let mut s = good();
        s.events
            .push(ev(3, "StockIncreased", "products", "i3", Some("k3")));
        let v = result(&s, names::EXACTLY_ONCE).violations;
        assert!(v[0].what.contains("without a StockDecreased"));
    }

    #[test]
    fn exactly_once_fails_on_a_delivered_cancelled_order() {
        let mut s = good();
        s.events
            .push(ev(4, "DeliveryCompleted", "delivery", "x4", None));
        let v = result(&s, names::EXACTLY_ONCE).violations;
        assert_eq!(v[0].order, Some(4));
        assert!(
            v[0].what
                .contains("DeliveryCompleted for a cancelled order")
        );
    }

    #[test]
    fn no_double_apply_fails_on_two_events_from_one_cause() {
        let mut s = good();
        s.events
            .push(ev(4, "CancelRefused", "delivery", "n4", Some("r4")));
        s.events
            .push(ev(4, "CancelRefused", "delivery", "n4-bis", Some("r4")));
        let v = only_fails(&s, names::NO_DOUBLE_APPLY);
        assert_eq!(v[0].order, Some(4));
        assert!(v[0].what.contains("2 distinct CancelRefused by delivery"));
        assert!(v[0].events.iter().any(|e| e.contains("n4-bis")));
    }

    #[test]
    fn stock_fails_when_units_appear_or_vanish() {
        let mut s = good();
        s.products[0].stock = 8;
        let v = only_fails(&s, names::STOCK);
        assert!(v[0].what.contains("created with 10"));

        // Conserved in total, but delivered does not match the deliveries.
        let mut s = good();
        s.products[0].reserved = 2;
        s.products[0].delivered = 1;
        let v = only_fails(&s, names::STOCK);
        assert!(v[0].what.contains("DeliveryCompleted deliveries hold 2"));

        // Conserved, but more reserved than the confirmed orders hold.
        let mut s = good();
        s.products[0].stock = 6;
        s.products[0].reserved = 2;
        let v = only_fails(&s, names::STOCK);
        assert!(v[0].what.contains("OrderCompleted orders hold 3"));
    }

    #[test]
    fn agree_fails_when_the_services_disagree() {
        // products says delivered, delivery says only started.
        let mut s = good();
        s.reservations[1].state = "Delivered".into();
        let v = result(&s, names::AGREE).violations;
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].order, Some(2));
        assert!(
            v[0].what
                .contains("reservation Delivered but delivery DeliveryStarted")
        );

        // a cancelled order whose delivery goes on.
        let mut s = good();
        s.deliveries[2].delivery_state = "DeliveryStarted".into();
        let v = only_fails(&s, names::AGREE);
        assert_eq!(v[0].order, Some(3));

        // orders' view of the delivery is stale.
        let mut s = good();
        s.orders[1].delivery_state = Some("DeliveryCompleted".into());
        let v = only_fails(&s, names::AGREE);
        assert!(
            v[0].what
                .contains("orders says deliveryState DeliveryCompleted")
        );

        // a cancelled order that still holds stock.
        let mut s = good();
        s.reservations[3].state = "Reserved".into();
        let v = result(&s, names::AGREE).violations;
        assert!(
            v[0].what
                .contains("OrderCancelled but reservation is Reserved")
        );

        // a delivery for an order orders never heard of.
        let mut s = good();
        s.deliveries.push(delivery(50, 77, "DeliveryStarted"));
        let v = only_fails(&s, names::AGREE);
        assert_eq!(v[0].order, Some(77));
    }

    #[test]
    fn a_5xx_fails() {
        let mut s = good();
        s.http_5xx
            .push("PATCH http://127.0.0.1:1/orders/2 → 500 {}".into());
        let v = only_fails(&s, names::NO_5XX);
        assert!(v[0].what.contains("500"));
    }

    #[test]
    fn dlt_fails_on_a_parked_saga_event_and_on_unparked_poison() {
        let mut s = good();
        s.dead_letters.push(DeadLetterRow::from_json(&json!({
            "kind": "Rejected", "reason": "order 2 does not exist here",
            "consumerGroup": "orders", "key": "2", "payloadBytes": 300
        })));
        let v = only_fails(&s, names::DLT);
        assert_eq!(v[0].order, Some(2));

        let mut s = good();
        s.dead_letters
            .retain(|l| l.consumer_group.as_deref() != Some("delivery"));
        let v = only_fails(&s, names::DLT);
        assert_eq!(v[0].what, "poison-1 was not parked by delivery");
    }

    #[test]
    fn health_fails_on_a_503() {
        let mut s = good();
        s.health[1].1 = Ok(503);
        let v = only_fails(&s, names::HEALTH);
        assert!(v[0].what.contains("products/health answered 503"));
        s.health[1].1 = Err("connection refused".into());
        assert!(!result(&s, names::HEALTH).passed());
    }

    #[test]
    fn a_snapshot_of_a_moving_mall_fails() {
        let mut s = good();
        s.not_quiet = Some("products has 2 event(s) in its outbox".into());
        let v = only_fails(&s, names::QUIET);
        assert!(v[0].what.contains("outbox"));
    }

    #[test]
    fn too_little_work_fails() {
        let mut s = good();
        s.planned_orders = 10;
        let v = only_fails(&s, names::WORKLOAD);
        assert!(v[0].what.contains("4 of 10 orders offered"), "{v:?}");
        assert!(v[1].what.contains("at least 9 expected"), "{v:?}");

        let mut s = good();
        s.given_up = 1;
        let v = only_fails(&s, names::WORKLOAD);
        assert!(v[0].what.contains("1 orders given up"), "{v:?}");

        let mut s = good();
        s.follow_ups_applied = 0;
        let v = only_fails(&s, names::WORKLOAD);
        assert!(v[0].what.contains("0 follow-ups applied"));
    }

    /// Two orders of one offer: a retried POST placed it again.
    #[test]
    fn an_offer_placed_twice_fails() {
        let mut s = good();
        let twin = s.orders[1].id;
        s.orders[0].customer_name = Some(format!("Chaos #{twin}"));
        let v = result(&s, names::PLACED_ONCE).violations;
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].what.contains("placed 2 times"), "{v:?}");
    }

    #[test]
    fn a_missing_or_wrong_event_on_the_topic_fails() {
        // No data at all is not a pass.
        let mut s = good();
        s.accepted.clear();
        s.orders.clear();
        s.reservations.clear();
        s.deliveries.clear();
        s.events.clear();
        s.products[0] = ProductRow {
            id: 1,
            initial: 10,
            stock: 10,
            reserved: 0,
            delivered: 0,
        };
        assert!(!result(&s, names::COMPLETE).passed());

        // An accepted order's OrderPlaced lost.
        let mut s = good();
        s.events.retain(|e| e.event_id != "p2");
        let v = result(&s, names::COMPLETE).violations;
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].order, Some(2));
        assert!(v[0].what.contains("no OrderPlaced"), "{}", v[0].what);

        // A completed order's DeliveryStarted lost.
        let mut s = good();
        s.events.retain(|e| e.event_id != "d1");
        let v = only_fails(&s, names::COMPLETE);
        assert!(v[0].what.contains("no DeliveryStarted"), "{}", v[0].what);

        // Wrong key, product, quantity.
        let mut s = good();
        s.events[1].key = Some("2".into());
        s.events[2].product_id = Some(7);
        s.events[3].quantity = Some(5);
        let v = only_fails(&s, names::COMPLETE);
        assert_eq!(v[0].order, Some(1));
        assert!(v[0].what.contains("is keyed 2"), "{}", v[0].what);
        assert!(v[0].what.contains("names product Some(7)"), "{}", v[0].what);
        assert!(
            v[0].what.contains("names quantity Some(5), the order 2"),
            "{}",
            v[0].what
        );
    }

    #[test]
    fn unreadable_state_fails() {
        let mut s = good();
        s.read_errors.push("GET /reservations: 404".into());
        only_fails(&s, names::READABLE);
    }

    #[test]
    fn rows_parse_from_the_api_json() {
        let o = OrderRow::from_json(&json!({"id": 3, "productId": 1, "quantity": 2,
            "state": "OrderCompleted", "deliveryState": "DeliveryStarted", "cancelRequested": true}))
        .expect("order");
        assert!(o.cancel_requested);
        assert_eq!(o.parked_events, 0);
        assert_eq!(o.delivery_state.as_deref(), Some("DeliveryStarted"));
        let r = ReservationRow::from_json(&json!({"orderId": 3, "productId": 1, "quantity": 2,
            "state": "Reserved"}))
        .expect("reservation");
        assert_eq!(r.state, "Reserved");
        assert!(DeliveryRow::from_json(&json!({"id": 1, "orderId": 3})).is_err());
        let p = ProductRow::from_json(
            &json!({"id": 1, "name": "x", "price": 1, "stock": 5, "reserved": 1, "delivered": 0}),
            6,
        )
        .expect("product");
        assert_eq!(p.initial, 6);
        let e = TopicEvent::from_message(
            Some("3"),
            &json!({"eventType": "StockDecreased", "eventId": "0eb2a7c1-f79b", "source": "products",
                    "correlationId": "3", "causationId": "a93df157-1916", "initiator": null}),
        )
        .expect("event");
        assert_eq!(e.short(), "StockDecreased by products 0eb2a7c1 ← a93df157");
        assert!(
            TopicEvent::from_message(
                Some("poison-2"),
                &json!({"eventType": "OrderPlaced", "orderId": "x"})
            )
            .is_none()
        );
    }
}
