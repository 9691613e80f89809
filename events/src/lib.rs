//! The event contract of the 12st Mall: every message on the saga topic.
//!
//! A message is one flat camelCase JSON object: the event's own fields (starting with
//! `eventType`) followed by the envelope (`eventId`, `timestamp`, `source`, `correlationId`,
//! `causationId`, `initiator`). It is meant to be read by people in a console consumer as much
//! as by the services.
//!
//! `initiator` is how a service recognises a compensation chain it started itself: the service
//! whose own decision began the chain stamps its name, and every event caused along the chain
//! carries it unchanged ([`Envelope::caused_by`]).

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

pub mod dead_letter;
pub use dead_letter::{DeadLetter, DeadLetterKind, DeadLetterNote, ParkedFrom};

/// The three services of the mall; used as `source` and `initiator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// The orders service (:8081).
    Orders,
    /// The products service (:8085).
    Products,
    /// The delivery service (:8082).
    Delivery,
}

impl Service {
    /// The lowercase name used on the wire, in consumer group ids and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Orders => "orders",
            Service::Products => "products",
            Service::Delivery => "delivery",
        }
    }

    /// The service named `text` (its wire name), if any.
    pub fn parse(text: &str) -> Option<Self> {
        [Service::Orders, Service::Products, Service::Delivery]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a delivery stands; the wire's `deliveryState`. Typed here because three services read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Handed to a courier.
    #[serde(rename = "DeliveryStarted")]
    Started,
    /// Delivered; final: the goods left, so the order can no longer be cancelled or restocked.
    #[serde(rename = "DeliveryCompleted")]
    Completed,
    /// Called off, by the courier or as a compensation; final.
    #[serde(rename = "DeliveryCancelled")]
    Cancelled,
}

impl DeliveryState {
    /// The wire and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Started => "DeliveryStarted",
            DeliveryState::Completed => "DeliveryCompleted",
            DeliveryState::Cancelled => "DeliveryCancelled",
        }
    }

    /// Parses the wire and API name.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Started, Self::Completed, Self::Cancelled]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A customer placed an order; it is pending until stock and delivery confirm it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    pub order_id: i64,
    pub product_id: i64,
    pub product_name: Option<String>,
    pub quantity: i64,
    /// Total price of the order as orders' catalog replica knew it; null if unknown.
    pub price: Option<i64>,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub customer_addr: Option<String>,
}

/// Stock was reserved and delivery started: the saga's all-done step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCompleted {
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: String,
}

/// The order was cancelled, by the customer or as a compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: String,
    pub state_message: String,
    /// Why, typed: an event without a cause (`causationId` null) may come from a person or from
    /// orders' own timer, and readers (the dashboard's timeline) should not parse prose to tell.
    /// Absent in events written before it existed; a reason this version does not know
    /// (a newer producer's) reads as absent, so the cancel is still handled.
    #[serde(default, deserialize_with = "lenient::known")]
    pub reason: Option<CancelReason>,
}

/// Why orders cancelled an order; the wire's `reason` of [`OrderCancelled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CancelReason {
    /// The customer cancelled (`PATCH /orders/{id}`): at once while pending, or when delivery
    /// granted the request.
    Customer,
    /// Products could not reserve the stock.
    OutOfStock,
    /// The courier cancelled the delivery.
    Courier,
    /// Still pending after `SAGA_TIMEOUT_S`: orders' timer cancelled it, no request and no event.
    SagaTimeout,
}

/// A product's catalog entry changed; orders keeps its replica current from these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductChanged {
    pub product_id: i64,
    pub product_name: String,
    pub product_price: i64,
    pub product_stock: i64,
}

/// Stock was reserved (`StockDecreased`) or released (`StockIncreased`) for an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockMoved {
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    /// The product's stock after the move.
    pub product_stock: i64,
}

/// Products could not reserve the order's quantity; starts a compensation chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductOutOfStock {
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    /// The stock on hand; null when the product does not exist.
    pub product_stock: Option<i64>,
    pub state_message: String,
}

/// A delivery was created for an order and handed to a courier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStarted {
    pub delivery_id: i64,
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: String,
    pub customer_name: Option<String>,
    pub delivery_address: Option<String>,
    #[serde(deserialize_with = "lenient::started")]
    pub delivery_state: DeliveryState,
}

/// The courier delivered the order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCompleted {
    pub delivery_id: i64,
    pub order_id: i64,
    #[serde(deserialize_with = "lenient::completed")]
    pub delivery_state: DeliveryState,
}

/// The delivery was cancelled, by the courier or as a compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCancelled {
    pub delivery_id: i64,
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    #[serde(deserialize_with = "lenient::cancelled")]
    pub delivery_state: DeliveryState,
    pub state_message: String,
}

/// The customer asked to cancel an order that was already confirmed. Only delivery knows
/// whether the goods have left, so it decides: DeliveryCancelled (the cancel goes on) or
/// CancelRefused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelRequested {
    pub order_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub customer_id: String,
    pub state_message: String,
}

/// Delivery refused a requested cancel: the delivery is already completed (or there is none
/// to cancel). The order stays as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRefused {
    pub order_id: i64,
    /// The delivery, when there is one.
    pub delivery_id: Option<i64>,
    /// Its state, when there is one (and this version knows it).
    #[serde(default, deserialize_with = "lenient::known")]
    pub delivery_state: Option<DeliveryState>,
    pub state_message: String,
}

/// Orders closed a cancel request delivery had not answered within the saga timeout (delivery
/// down, or the request parked): the order stays as it is. A late answer still counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequestExpired {
    pub order_id: i64,
    pub state_message: String,
}

/// Every event type of the saga; `eventType` on the wire is the variant name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "eventType")]
#[allow(missing_docs)]
pub enum Event {
    OrderPlaced(OrderPlaced),
    OrderCompleted(OrderCompleted),
    OrderCancelled(OrderCancelled),
    OrderCancelRequested(OrderCancelRequested),
    ProductChanged(ProductChanged),
    StockDecreased(StockMoved),
    StockIncreased(StockMoved),
    ProductOutOfStock(ProductOutOfStock),
    DeliveryStarted(DeliveryStarted),
    DeliveryCompleted(DeliveryCompleted),
    DeliveryCancelled(DeliveryCancelled),
    CancelRefused(CancelRefused),
    CancelRequestExpired(CancelRequestExpired),
    /// A service parked one of the order's saga events.
    EventParked(DeadLetterNote),
    /// A parked event was sent back to its service with a new event id.
    DeadLetterRedriven(DeadLetterNote),
    /// A parked event was given up, with a reason.
    DeadLetterDiscarded(DeadLetterNote),
}

impl Event {
    /// Every `eventType` this contract knows; anything else is skipped by consumers.
    pub const TYPES: [&'static str; 16] = [
        "OrderPlaced",
        "OrderCompleted",
        "OrderCancelled",
        "OrderCancelRequested",
        "ProductChanged",
        "StockDecreased",
        "StockIncreased",
        "ProductOutOfStock",
        "DeliveryStarted",
        "DeliveryCompleted",
        "DeliveryCancelled",
        "CancelRefused",
        "CancelRequestExpired",
        "EventParked",
        "DeadLetterRedriven",
        "DeadLetterDiscarded",
    ];

    /// The `eventType` written on the wire.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::OrderPlaced(_) => "OrderPlaced",
            Event::OrderCompleted(_) => "OrderCompleted",
            Event::OrderCancelled(_) => "OrderCancelled",
            Event::OrderCancelRequested(_) => "OrderCancelRequested",
            Event::ProductChanged(_) => "ProductChanged",
            Event::StockDecreased(_) => "StockDecreased",
            Event::StockIncreased(_) => "StockIncreased",
            Event::ProductOutOfStock(_) => "ProductOutOfStock",
            Event::DeliveryStarted(_) => "DeliveryStarted",
            Event::DeliveryCompleted(_) => "DeliveryCompleted",
            Event::DeliveryCancelled(_) => "DeliveryCancelled",
            Event::CancelRefused(_) => "CancelRefused",
            Event::CancelRequestExpired(_) => "CancelRequestExpired",
            Event::EventParked(_) => "EventParked",
            Event::DeadLetterRedriven(_) => "DeadLetterRedriven",
            Event::DeadLetterDiscarded(_) => "DeadLetterDiscarded",
        }
    }

    /// The order this event belongs to; `None` for catalog-only events.
    pub fn order_id(&self) -> Option<i64> {
        match self {
            Event::OrderPlaced(e) => Some(e.order_id),
            Event::OrderCompleted(e) => Some(e.order_id),
            Event::OrderCancelled(e) => Some(e.order_id),
            Event::OrderCancelRequested(e) => Some(e.order_id),
            Event::ProductChanged(_) => None,
            Event::StockDecreased(e) | Event::StockIncreased(e) => Some(e.order_id),
            Event::ProductOutOfStock(e) => Some(e.order_id),
            Event::DeliveryStarted(e) => Some(e.order_id),
            Event::DeliveryCompleted(e) => Some(e.order_id),
            Event::DeliveryCancelled(e) => Some(e.order_id),
            Event::CancelRefused(e) => Some(e.order_id),
            Event::CancelRequestExpired(e) => Some(e.order_id),
            Event::EventParked(e)
            | Event::DeadLetterRedriven(e)
            | Event::DeadLetterDiscarded(e) => Some(e.order_id),
        }
    }

    /// The Kafka key: the order id for saga events, so one order's events stay in order in one
    /// partition; the product id for catalog events, so one product's changes stay in order.
    pub fn key(&self) -> String {
        match (self.order_id(), self) {
            (Some(order_id), _) => order_id.to_string(),
            (None, Event::ProductChanged(e)) => e.product_id.to_string(),
            (None, _) => String::new(),
        }
    }
}

/// One message on the topic: an [`Event`] plus who sent it, when, and what caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The event itself; flattened so the message stays one flat object.
    #[serde(flatten)]
    pub event: Event,
    /// Unique per event; consumers record it to ignore redeliveries.
    pub event_id: Uuid,
    /// When the event was decided, RFC 3339 in UTC.
    #[serde(with = "rfc3339")]
    pub timestamp: DateTime<Utc>,
    /// The service that published the event.
    pub source: Service,
    /// The order id for saga events; null for catalog events.
    pub correlation_id: Option<String>,
    /// The `eventId` of the event that caused this one; null when an HTTP request did.
    pub causation_id: Option<Uuid>,
    /// The service whose decision started the compensation chain; null on the forward path.
    /// A service this version does not know reads as null: it is none of us, which is all the
    /// rules ask.
    #[serde(default, deserialize_with = "lenient::known")]
    pub initiator: Option<Service>,
}

impl Envelope {
    /// A new event decided by `source` on its own (an HTTP request, or start-up).
    pub fn new(source: Service, event: Event) -> Self {
        Envelope {
            correlation_id: event.order_id().map(|id| id.to_string()),
            event,
            // Time-ordered (UUIDv7): every service indexes event ids (inbox, outbox, order
            // history), and ids that grow with time land on the indexes' last pages instead
            // of a random page of a million-row index.
            event_id: Uuid::now_v7(),
            timestamp: Utc::now().trunc_subsecs(3), // what the wire carries
            source,
            causation_id: None,
            initiator: None,
        }
    }

    /// Marks this event as caused by `cause`: links it and carries the chain's initiator on.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causation_id = Some(cause.event_id);
        self.initiator = cause.initiator;
        self
    }

    /// Marks this event as the start of a compensation chain decided by `service`.
    pub fn initiated_by(mut self, service: Service) -> Self {
        self.initiator = Some(service);
        self
    }

    /// True when `service` started the compensation chain this event belongs to ("isMe").
    pub fn initiated_by_service(&self, service: Service) -> bool {
        self.initiator == Some(service)
    }

    /// The Kafka key for this event; see [`Event::key`].
    pub fn key(&self) -> String {
        self.event.key()
    }

    /// The `eventType` of this event.
    pub fn event_type(&self) -> &'static str {
        self.event.event_type()
    }

    /// The JSON text published on the topic.
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// What a consumer found in a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A well-formed event of a type this contract knows.
    Known(Box<Envelope>),
    /// A well-formed object of a type this contract does not know; consumers skip it.
    Unknown {
        /// The message's `eventType`.
        event_type: String,
    },
}

/// Why a message is not a valid event; the text is meant for a person reading the DLT.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The bytes are not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// The object has no string `eventType`.
    #[error("missing or non-string field `eventType`")]
    MissingEventType,
    /// A known type whose fields do not match the contract.
    #[error("invalid {event_type} event: {reason}")]
    Invalid {
        /// The message's `eventType`.
        event_type: String,
        /// What is wrong with it, as serde reports it.
        reason: String,
    },
    /// A text field holds a NUL character, which PostgreSQL text cannot store: applying it
    /// would fail the same way on every attempt, so it is parked like any invalid event.
    #[error("invalid {event_type} event: field {field} contains a NUL character (\\u0000)")]
    Nul {
        /// The message's `eventType`.
        event_type: String,
        /// Where the NUL is, as a JSON path (`customerName`, `payload.note`).
        field: String,
    },
}

/// The path of the first string (or object key) in `value` holding a NUL character, if any:
/// `customerName`, `items[2].note`. PostgreSQL text cannot hold one, so the services refuse
/// NULs at their edges (HTTP: 422; topic: parked) rather than fail inside a write.
pub fn find_nul(value: &serde_json::Value) -> Option<String> {
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Some(path.to_owned()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(k, v)| {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if k.contains('\0') {
                    return Some(here.replace('\0', "\\u0000"));
                }
                walk(v, &here)
            }),
            _ => None,
        }
    }
    walk(value, "")
}

/// Reads one message from the topic. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(DecodeError::NotJson(format!("found {value}")));
    }
    let event_type = value
        .get("eventType")
        .and_then(|t| t.as_str())
        .ok_or(DecodeError::MissingEventType)?
        .to_owned();
    if !Event::TYPES.contains(&event_type.as_str()) {
        return Ok(Decoded::Unknown { event_type });
    }
    if let Some(field) = find_nul(&value) {
        return Err(DecodeError::Nul { event_type, field });
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| Decoded::Known(Box::new(e)))
        .map_err(|e| DecodeError::Invalid {
            event_type,
            reason: e.to_string(),
        })
}

/// Decoding of the contract's closed enums that a newer producer may extend: an unknown value
/// decodes to a stated fallback instead of making the whole event invalid, which would park
/// it and leave its saga stuck (a rolling upgrade that adds a cancel reason). Known values
/// keep their wire names; a value of the wrong JSON type is still an error.
mod lenient {
    use super::*;
    use serde::Deserializer;
    use serde::de::DeserializeOwned;

    /// The value if this version knows it; `None` for null or an unknown name.
    pub fn known<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        let name = Option::<String>::deserialize(d)?;
        Ok(name.and_then(|name| serde_json::from_value(serde_json::Value::String(name)).ok()))
    }

    /// DeliveryStarted's state; an unknown one is what the event type says.
    pub fn started<'de, D: Deserializer<'de>>(d: D) -> Result<DeliveryState, D::Error> {
        or_by_type(d, DeliveryState::Started)
    }

    /// DeliveryCompleted's state; an unknown one is what the event type says.
    pub fn completed<'de, D: Deserializer<'de>>(d: D) -> Result<DeliveryState, D::Error> {
        or_by_type(d, DeliveryState::Completed)
    }

    /// DeliveryCancelled's state; an unknown one is what the event type says.
    pub fn cancelled<'de, D: Deserializer<'de>>(d: D) -> Result<DeliveryState, D::Error> {
        or_by_type(d, DeliveryState::Cancelled)
    }

    fn or_by_type<'de, D: Deserializer<'de>>(
        d: D,
        by_type: DeliveryState,
    ) -> Result<DeliveryState, D::Error> {
        let name = String::deserialize(d)?;
        Ok(DeliveryState::parse(&name).unwrap_or(by_type))
    }
}

/// RFC 3339 timestamps with millisecond precision, always in UTC (`Z`).
mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                serde::de::Error::custom(format!("timestamp {text:?} is not RFC 3339: {e}"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn placed() -> Event {
        Event::OrderPlaced(OrderPlaced {
            order_id: 7,
            product_id: 1,
            product_name: Some("TV".into()),
            quantity: 2,
            price: Some(20000),
            customer_id: "1@uengine.org".into(),
            customer_name: Some("Kim".into()),
            customer_addr: Some("Seoul".into()),
        })
    }

    /// A NUL in any text field of any event (or of the envelope) is an invalid event naming
    /// the field, so a consumer parks it instead of failing its write on PostgreSQL for ever.
    #[test]
    fn a_nul_in_any_text_field_is_an_invalid_event_naming_the_field() {
        for event in every_event() {
            let clean = serde_json::to_value(Envelope::new(Service::Orders, event)).unwrap();
            assert!(find_nul(&clean).is_none());
            let mut texts = Vec::new();
            collect_text_paths(&clean, &mut Vec::new(), &mut texts);
            assert!(!texts.is_empty());
            for path in texts {
                let mut poisoned = clean.clone();
                let mut at = &mut poisoned;
                for key in &path {
                    at = &mut at[key.as_str()];
                }
                if path.last().map(String::as_str) == Some("eventType") {
                    continue; // an unknown type then: skipped, never written
                }
                *at = serde_json::Value::String(format!("a\0{}", at.as_str().unwrap()));
                let bytes = serde_json::to_vec(&poisoned).unwrap();
                match decode(&bytes) {
                    Err(DecodeError::Nul { field, .. }) => assert_eq!(field, path.join(".")),
                    other => panic!("{path:?}: {other:?}"),
                }
            }
        }
        let key = br#"{"eventType":"OrderPlaced","a\u0000b":1}"#;
        assert!(matches!(decode(key), Err(DecodeError::Nul { .. })));
    }

    fn collect_text_paths(
        value: &serde_json::Value,
        path: &mut Vec<String>,
        out: &mut Vec<Vec<String>>,
    ) {
        match value {
            serde_json::Value::String(_) => out.push(path.clone()),
            serde_json::Value::Object(fields) => {
                for (k, v) in fields {
                    path.push(k.clone());
                    collect_text_paths(v, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    fn every_event() -> Vec<Event> {
        let moved = StockMoved {
            order_id: 7,
            product_id: 1,
            quantity: 2,
            product_stock: 8,
        };
        vec![
            placed(),
            Event::OrderCompleted(OrderCompleted {
                order_id: 7,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
            }),
            Event::OrderCancelled(OrderCancelled {
                order_id: 7,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
                state_message: "why".into(),
                reason: Some(CancelReason::SagaTimeout),
            }),
            Event::ProductChanged(ProductChanged {
                product_id: 1,
                product_name: "TV".into(),
                product_price: 10000,
                product_stock: 8,
            }),
            Event::StockDecreased(moved.clone()),
            Event::StockIncreased(moved),
            Event::ProductOutOfStock(ProductOutOfStock {
                order_id: 7,
                product_id: 1,
                quantity: 100,
                product_stock: Some(10),
                state_message: "short".into(),
            }),
            Event::DeliveryStarted(DeliveryStarted {
                delivery_id: 3,
                order_id: 7,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
                customer_name: None,
                delivery_address: Some("Seoul".into()),
                delivery_state: DeliveryState::Started,
            }),
            Event::DeliveryCompleted(DeliveryCompleted {
                delivery_id: 3,
                order_id: 7,
                delivery_state: DeliveryState::Completed,
            }),
            Event::DeliveryCancelled(DeliveryCancelled {
                delivery_id: 3,
                order_id: 7,
                product_id: 1,
                quantity: 2,
                delivery_state: DeliveryState::Cancelled,
                state_message: "courier failed".into(),
            }),
            Event::OrderCancelRequested(OrderCancelRequested {
                order_id: 7,
                product_id: 1,
                quantity: 2,
                customer_id: "c".into(),
                state_message: "asked by the customer".into(),
            }),
            Event::CancelRefused(CancelRefused {
                order_id: 7,
                delivery_id: Some(3),
                delivery_state: Some(DeliveryState::Completed),
                state_message: "already delivered".into(),
            }),
            Event::CancelRequestExpired(CancelRequestExpired {
                order_id: 7,
                state_message: "unanswered".into(),
            }),
            Event::EventParked(note(None)),
            Event::DeadLetterRedriven(note(Some(Uuid::nil()))),
            Event::DeadLetterDiscarded(note(None)),
        ]
    }

    fn note(redrive_event_id: Option<Uuid>) -> DeadLetterNote {
        DeadLetterNote {
            order_id: 7,
            service: Service::Delivery,
            dead_letter_id: 2,
            parked_event_type: "OrderCancelRequested".into(),
            parked_event_id: Uuid::nil(),
            state_message: "refused".into(),
            redrive_event_id,
        }
    }

    #[test]
    fn every_event_type_round_trips() {
        let events = every_event();
        assert_eq!(events.len(), Event::TYPES.len());
        for event in events {
            let sent = Envelope::new(Service::Orders, event).initiated_by(Service::Products);
            let json = sent.to_json();
            assert!(json.starts_with(&format!("{{\"eventType\":\"{}\"", sent.event_type())));
            match decode(json.as_bytes()) {
                Ok(Decoded::Known(got)) => assert_eq!(*got, sent),
                other => panic!("{json} decoded to {other:?}"),
            }
        }
    }

    #[test]
    fn golden_json() {
        let envelope = Envelope {
            event: placed(),
            event_id: Uuid::nil(),
            timestamp: Utc.with_ymd_and_hms(2026, 5, 28, 15, 20, 24).unwrap(),
            source: Service::Orders,
            correlation_id: Some("7".into()),
            causation_id: None,
            initiator: None,
        };
        let golden = r#"{"eventType":"OrderPlaced","orderId":7,"productId":1,"productName":"TV","quantity":2,"price":20000,"customerId":"1@uengine.org","customerName":"Kim","customerAddr":"Seoul","eventId":"00000000-0000-0000-0000-000000000000","timestamp":"2026-05-28T15:20:24.000Z","source":"orders","correlationId":"7","causationId":null,"initiator":null}"#;
        assert_eq!(envelope.to_json(), golden);
        assert_eq!(
            decode(golden.as_bytes()),
            Ok(Decoded::Known(Box::new(envelope)))
        );
    }

    #[test]
    fn a_cancel_reason_is_typed_on_the_wire_and_optional_for_older_events() {
        let cancelled = |reason: &str| {
            format!(
                r#"{{"eventType":"OrderCancelled","orderId":7,"productId":1,"quantity":2,"customerId":"c","stateMessage":"why",{reason}"eventId":"00000000-0000-0000-0000-000000000000","timestamp":"2026-05-28T15:20:24.000Z","source":"orders","correlationId":"7","causationId":null,"initiator":"orders"}}"#
            )
        };
        let reason_of = |json: &str| match decode(json.as_bytes()) {
            Ok(Decoded::Known(e)) => match e.event {
                Event::OrderCancelled(c) => c.reason,
                other => panic!("decoded to {other:?}"),
            },
            other => panic!("{json} decoded to {other:?}"),
        };
        assert_eq!(
            reason_of(&cancelled(r#""reason":"sagaTimeout","#)),
            Some(CancelReason::SagaTimeout)
        );
        assert_eq!(
            reason_of(&cancelled(r#""reason":"outOfStock","#)),
            Some(CancelReason::OutOfStock)
        );
        assert_eq!(reason_of(&cancelled("")), None);
        // A reason added by a newer producer is "not stated" here, not an invalid event.
        assert_eq!(reason_of(&cancelled(r#""reason":"boredom","#)), None);
    }

    /// The wire JSON of `event` with every enum value replaced by one this version does not
    /// know and a field it does not know added, as a newer producer could send it.
    fn from_a_newer_producer(event: Event) -> Envelope {
        let sent = Envelope::new(Service::Delivery, event).initiated_by(Service::Orders);
        let mut value: serde_json::Value =
            serde_json::from_str(&sent.to_json()).expect("an event is JSON");
        let object = value.as_object_mut().expect("an event is an object");
        object.insert(
            "addedInVersion2".into(),
            serde_json::json!({"nested": [1, 2]}),
        );
        object.insert("initiator".into(), "payments".into());
        if object.contains_key("reason") {
            object.insert("reason".into(), "admin".into());
        }
        if object.contains_key("deliveryState") {
            object.insert("deliveryState".into(), "DeliveryLost".into());
        }
        match decode(value.to_string().as_bytes()) {
            Ok(Decoded::Known(got)) => *got,
            other => panic!("{value} decoded to {other:?}: a consumer would park it"),
        }
    }

    #[test]
    fn unknown_enum_values_and_fields_decode_to_known_fallbacks() {
        for event in every_event() {
            let event_type = event.event_type();
            let got = from_a_newer_producer(event.clone());
            assert_eq!(
                got.initiator, None,
                "{event_type}: an unknown initiator is not us"
            );
            let expected = match event {
                // Each delivery event says its state in its type; an unknown state falls back
                // to what the type means.
                Event::DeliveryStarted(mut e) => {
                    e.delivery_state = DeliveryState::Started;
                    Event::DeliveryStarted(e)
                }
                Event::DeliveryCompleted(mut e) => {
                    e.delivery_state = DeliveryState::Completed;
                    Event::DeliveryCompleted(e)
                }
                Event::DeliveryCancelled(mut e) => {
                    e.delivery_state = DeliveryState::Cancelled;
                    Event::DeliveryCancelled(e)
                }
                // A refusal's state is optional: unknown is "not stated".
                Event::CancelRefused(mut e) => {
                    e.delivery_state = None;
                    Event::CancelRefused(e)
                }
                // So is a cancel's reason, as in events written before it existed.
                Event::OrderCancelled(mut e) => {
                    e.reason = None;
                    Event::OrderCancelled(e)
                }
                other => other,
            };
            assert_eq!(got.event, expected, "{event_type}");
        }
    }

    #[test]
    fn known_enum_values_keep_their_wire_names() {
        for event in every_event() {
            let sent = Envelope::new(Service::Delivery, event).initiated_by(Service::Products);
            let json = sent.to_json();
            assert!(json.contains(r#""initiator":"products""#), "{json}");
            match decode(json.as_bytes()) {
                Ok(Decoded::Known(got)) => assert_eq!(*got, sent),
                other => panic!("{json} decoded to {other:?}"),
            }
        }
        let refused = CancelRefused {
            order_id: 7,
            delivery_id: None,
            delivery_state: None,
            state_message: "none".into(),
        };
        let json = Envelope::new(Service::Delivery, Event::CancelRefused(refused)).to_json();
        assert!(json.contains(r#""deliveryState":null"#), "{json}");
        let without_state = json.replace(r#""deliveryState":null,"#, "");
        assert!(matches!(
            decode(without_state.as_bytes()),
            Ok(Decoded::Known(_))
        ));
        // A wrong type is still an invalid event, not a fallback.
        let numeric = json.replace(r#""deliveryState":null"#, r#""deliveryState":3"#);
        assert!(matches!(
            decode(numeric.as_bytes()),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn caused_by_links_and_carries_the_initiator() {
        let cause = Envelope::new(Service::Products, placed()).initiated_by(Service::Products);
        let effect = Envelope::new(Service::Orders, placed()).caused_by(&cause);
        assert_eq!(effect.causation_id, Some(cause.event_id));
        assert!(effect.initiated_by_service(Service::Products));
        assert!(!effect.initiated_by_service(Service::Orders));
        let forward = Envelope::new(Service::Orders, placed());
        assert_eq!(
            Envelope::new(Service::Delivery, placed())
                .caused_by(&forward)
                .initiator,
            None
        );
    }

    #[test]
    fn keys_are_order_ids_for_saga_events_and_product_ids_for_catalog_events() {
        for event in every_event() {
            let expected = match &event {
                Event::ProductChanged(p) => p.product_id.to_string(),
                _ => "7".to_string(),
            };
            assert_eq!(event.key(), expected, "{}", event.event_type());
        }
        let catalog = Envelope::new(
            Service::Products,
            Event::ProductChanged(ProductChanged {
                product_id: 4,
                product_name: "TABLE".into(),
                product_price: 40000,
                product_stock: 40,
            }),
        );
        assert_eq!(catalog.correlation_id, None);
    }

    #[test]
    fn the_seed_java_sample_is_rejected_with_a_clear_error() {
        let sample = r#"{"eventType":"OrderPlaced","timestamp":"20200528152024","id":1,"productId":1,"quantity":3,"price":10000,"customerName":"Kim","customerAddr":"Seoul","me":true}"#;
        match decode(sample.as_bytes()) {
            Err(DecodeError::Invalid { event_type, reason }) => {
                assert_eq!(event_type, "OrderPlaced");
                assert!(!reason.is_empty());
            }
            other => panic!("expected a clear rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_timestamp_is_named_in_the_error() {
        let mut value: serde_json::Value =
            serde_json::from_str(&Envelope::new(Service::Orders, placed()).to_json()).unwrap();
        value["timestamp"] = "20200528152024".into();
        let err = decode(value.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("20200528152024"), "{err}");
    }

    #[test]
    fn unknown_types_and_garbage_never_panic() {
        assert_eq!(
            decode(br#"{"eventType":"PaymentApproved","x":1}"#),
            Ok(Decoded::Unknown {
                event_type: "PaymentApproved".into()
            })
        );
        assert_eq!(decode(br#"{"x":1}"#), Err(DecodeError::MissingEventType));
        assert!(matches!(decode(b"not json"), Err(DecodeError::NotJson(_))));
        assert!(matches!(decode(b"[1,2]"), Err(DecodeError::NotJson(_))));
        assert!(matches!(
            decode(&[0xff, 0xfe]),
            Err(DecodeError::NotJson(_))
        ));
    }
}
