//! Reading the mall's state for the checks: the paged REST lists of the three services, the
//! products, the saga topic and its dead-letter topic, `/health`; and injecting poison.

use super::check::{
    DeadLetterRow, DeliveryRow, OrderRow, ProductRow, ReservationRow, Snapshot, TopicEvent,
};
use super::client::{Client, Reply};
use super::workload::{Product, Urls};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

/// Page size of the REST lists.
pub const PAGE: usize = 1000;

/// Reads every page of `GET {url}?after=<cursor>&limit=1000`, where the cursor is the
/// `cursor` field of a page's last row; stops at a short page.
pub async fn read_pages(
    client: &Client,
    what: &str,
    url: &str,
    cursor: &str,
) -> Result<Vec<Value>, String> {
    let mut rows = Vec::new();
    let mut after = 0i64;
    loop {
        let page_url = format!("{url}?after={after}&limit={PAGE}");
        let page = match client.call(what, "GET", &page_url, None).await {
            Reply::Status(200, Value::Array(page)) => page,
            Reply::Status(s, body) => {
                let mut body = body.to_string();
                body.truncate(200);
                return Err(format!("GET {page_url} answered {s} {body}"));
            }
            Reply::NoAnswer(e) => return Err(format!("GET {page_url}: {e}")),
        };
        let n = page.len();
        let next = page.last().and_then(|r| r[cursor].as_i64());
        rows.extend(page);
        if n < PAGE {
            return Ok(rows);
        }
        match next {
            Some(next) if next > after => after = next,
            _ => {
                return Err(format!(
                    "GET {page_url}: the {cursor:?} cursor did not advance"
                ));
            }
        }
    }
}

fn parse_rows<T>(
    rows: &[Value],
    parse: impl Fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    rows.iter().map(parse).collect()
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The Kafka key (lossy UTF-8).
    pub key: Option<String>,
    /// The value as JSON (`null` when it is not JSON).
    pub value: Value,
}

/// Reads a whole topic from the beginning up to its current end within `deadline` (the long
/// run's topic is large). A topic whose metadata has an error (it does not exist) is an
/// error, not an empty list.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    deadline: Duration,
) -> Result<Vec<RawMessage>, String> {
    let messages = crate::read_topic_within(brokers, topic, deadline).await?;
    Ok(messages
        .into_iter()
        .map(|m| RawMessage {
            key: m.key,
            value: m.value,
        })
        .collect())
}

/// What a snapshot needs to know besides the services.
pub struct Context<'a> {
    /// The HTTP client (its log gives the 5xx and request counts).
    pub client: &'a Client,
    /// The services.
    pub urls: &'a Urls,
    /// Bootstrap servers.
    pub brokers: &'a str,
    /// The saga topic.
    pub topic: &'a str,
    /// The products the run created.
    pub products: &'a [Product],
    /// The ids of every 201.
    pub accepted: BTreeSet<i64>,
    /// The poison keys injected.
    pub poison_keys: Vec<String>,
    /// How long a topic read may take.
    pub topic_deadline: Duration,
    /// Orders the workload was to offer.
    pub planned_orders: u64,
    /// Orders it offered.
    pub offered: u64,
    /// Offers it gave up.
    pub given_up: u64,
    /// Follow-ups a service accepted.
    pub follow_ups_applied: u64,
}

/// Reads everything the checks need, first whether the mall is quiet ([`crate::quiet`]): what
/// is read after a quiet moment is final. A source that cannot be read is named in
/// `read_errors` (and its rows are missing).
pub async fn snapshot(cx: Context<'_>) -> Snapshot {
    let services: Vec<crate::ServiceInstances> = [
        ("orders", &cx.urls.orders),
        ("products", &cx.urls.products),
        ("delivery", &cx.urls.delivery),
    ]
    .into_iter()
    .map(|(name, pool)| (name, pool.all().map(|(_, base)| base.to_owned()).collect()))
    .collect();
    let quiet_probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let not_quiet = crate::quiet(&quiet_probe, cx.brokers, cx.topic, &services)
        .await
        .err();
    let mut s = Snapshot {
        accepted: cx.accepted,
        poison_keys: cx.poison_keys,
        sources: 6,
        not_quiet,
        planned_orders: cx.planned_orders,
        offered: cx.offered,
        given_up: cx.given_up,
        follow_ups_applied: cx.follow_ups_applied,
        ..Snapshot::default()
    };
    let orders = read_pages(
        cx.client,
        "GET /orders (paged)",
        &format!("{}/orders", cx.urls.orders.pick()),
        "id",
    )
    .await;
    match orders.and_then(|rows| parse_rows(&rows, OrderRow::from_json)) {
        Ok(rows) => s.orders = rows,
        Err(e) => s.read_errors.push(format!("orders: {e}")),
    }
    let reservations = read_pages(
        cx.client,
        "GET /reservations (paged)",
        &format!("{}/reservations", cx.urls.products.pick()),
        "orderId",
    )
    .await;
    match reservations.and_then(|rows| parse_rows(&rows, ReservationRow::from_json)) {
        Ok(rows) => s.reservations = rows,
        Err(e) => s.read_errors.push(format!("reservations: {e}")),
    }
    let deliveries = read_pages(
        cx.client,
        "GET /deliveries (paged)",
        &format!("{}/deliveries", cx.urls.delivery.pick()),
        "id",
    )
    .await;
    match deliveries.and_then(|rows| parse_rows(&rows, DeliveryRow::from_json)) {
        Ok(rows) => s.deliveries = rows,
        Err(e) => s.read_errors.push(format!("deliveries: {e}")),
    }
    for p in cx.products {
        let url = format!("{}/products/{}", cx.urls.products.pick(), p.id);
        match cx
            .client
            .call("GET /products/{id}", "GET", &url, None)
            .await
        {
            Reply::Status(200, v) => match ProductRow::from_json(&v, p.initial) {
                Ok(row) => s.products.push(row),
                Err(e) => s.read_errors.push(format!("product {}: {e}", p.id)),
            },
            other => s.read_errors.push(format!("GET {url}: {other:?}")),
        }
    }
    match read_topic(cx.brokers, cx.topic, cx.topic_deadline).await {
        Ok(messages) => {
            s.events = messages
                .iter()
                .filter_map(|m| TopicEvent::from_message(m.key.as_deref(), &m.value))
                .collect();
        }
        Err(e) => s.read_errors.push(format!("topic {}: {e}", cx.topic)),
    }
    let dlt = format!("{}.DLT", cx.topic);
    match read_topic(cx.brokers, &dlt, cx.topic_deadline).await {
        Ok(messages) => {
            s.dead_letters = messages
                .iter()
                .map(|m| DeadLetterRow::from_json(&m.value))
                .collect();
        }
        Err(e) => s.read_errors.push(format!("topic {dlt}: {e}")),
    }
    for pool in [&cx.urls.orders, &cx.urls.products, &cx.urls.delivery] {
        for (instance, base) in pool.all() {
            s.health
                .push((instance.to_owned(), cx.client.health(base).await));
        }
    }
    let log = cx.client.log();
    s.requests = log.requests;
    s.http_5xx = log.server_errors.clone();
    s
}

/// The payload of the `n`-th poison message (1-based): a non-JSON text, a known event type with
/// bad fields, 200,000 NUL bytes; then round again.
pub fn poison_payload(n: usize) -> Vec<u8> {
    match n % 3 {
        1 => format!("poison-{n}: this is not JSON {{").into_bytes(),
        2 => br#"{"eventType":"OrderPlaced","orderId":"x"}"#.to_vec(),
        _ => vec![0u8; 200_000],
    }
}

/// A producer that may send large messages and waits out a broker restart.
pub fn poison_producer(brokers: &str) -> Result<FutureProducer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "10000000")
        .set("message.timeout.ms", "120000")
        .create()
        .map_err(|e| format!("poison producer: {e}"))
}

/// Publishes the `n`-th poison message with key `poison-<n>`; returns the key once the broker
/// acknowledged it.
pub async fn inject_poison(
    producer: &FutureProducer,
    topic: &str,
    n: usize,
) -> Result<String, String> {
    let key = format!("poison-{n}");
    let payload = poison_payload(n);
    producer
        .send(
            FutureRecord::to(topic).key(&key).payload(&payload),
            Duration::from_secs(130),
        )
        .await
        .map(|_| key.clone())
        .map_err(|(e, _)| format!("publishing {key} ({} bytes): {e}", payload.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_poisons() {
        assert!(serde_json::from_slice::<Value>(&poison_payload(1)).is_err());
        let bad: Value = serde_json::from_slice(&poison_payload(2)).expect("JSON");
        assert_eq!(bad["eventType"], "OrderPlaced");
        let nul = poison_payload(3);
        assert_eq!(nul.len(), 200_000);
        assert!(nul.iter().all(|b| *b == 0));
    }
}
