//! End-to-end checks of the saga, written once and run two ways: in-process against rdkafka's
//! `MockCluster` (`cargo test`), and against the three service binaries on a real broker
//! (`scripts/test.sh` → `stack-suite`). They assert on REST state and on the topic, never on
//! logs.

pub mod bench;
pub mod broker;
pub mod browser;
pub mod chaos;
pub mod kafka_proxy;
pub mod kafka_tools;
pub mod pg;
pub mod scenarios;
pub mod stack;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use std::future::Future;
use std::time::{Duration, Instant};

/// What a failed check says; scenarios return it instead of panicking so the real-broker suite
/// can report every scenario.
pub type Check<T = ()> = Result<T, String>;

/// A running mall as a client sees it: three base URLs and the topic.
#[derive(Clone)]
pub struct Mall {
    /// `http://host:port` of orders.
    pub orders: String,
    /// `http://host:port` of products.
    pub products: String,
    /// `http://host:port` of delivery.
    pub delivery: String,
    /// Bootstrap servers.
    pub brokers: String,
    /// The saga topic.
    pub topic: String,
    /// Every instance of each service, for [`Mall::wait_quiet`]; the three URLs above unless
    /// told otherwise ([`Mall::with_instances`]).
    instances: Vec<ServiceInstances>,
    http: reqwest::Client,
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    /// The Kafka key.
    pub key: Option<String>,
    /// The value as JSON (`null` when it is not JSON).
    pub value: Value,
    /// The raw value.
    pub raw: String,
    /// The Kafka headers (name, value as lossy UTF-8).
    pub headers: Vec<(String, String)>,
}

impl Mall {
    /// A client for services at these base URLs.
    pub fn new(
        orders: String,
        products: String,
        delivery: String,
        brokers: String,
        topic: String,
    ) -> Self {
        Mall {
            instances: vec![
                ("orders", vec![orders.clone()]),
                ("products", vec![products.clone()]),
                ("delivery", vec![delivery.clone()]),
            ],
            orders,
            products,
            delivery,
            brokers,
            topic,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Sends a request; returns the status and the JSON body.
    pub async fn call(&self, method: &str, url: &str, body: Option<Value>) -> Check<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut request = self.http.request(method.clone(), url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let value = serde_json::from_str(&text)
            .map_err(|_| format!("{method} {url} → {status}, body is not JSON: {text:?}"))?;
        Ok((status, value))
    }

    /// Sends a request and insists on `expected` status.
    pub async fn expect(
        &self,
        method: &str,
        url: &str,
        body: Option<Value>,
        expected: u16,
    ) -> Check<Value> {
        let (status, value) = self.call(method, url, body).await?;
        if status != expected {
            return Err(format!(
                "{method} {url}: expected {expected}, got {status} {value}"
            ));
        }
        Ok(value)
    }

    /// Creates a product in products' catalog; returns its id.
    pub async fn create_product(&self, name: &str, stock: i64) -> Check<i64> {
        let body = json!({ "name": name, "price": 1000, "stock": stock });
        let p = self
            .expect(
                "POST",
                &format!("{}/products", self.products),
                Some(body),
                201,
            )
            .await?;
        field_i64(&p, "id")
    }

    /// Places an order; returns its id.
    pub async fn place_order(&self, product_id: i64, quantity: i64) -> Check<i64> {
        let body = order_body(product_id, quantity);
        let o = self
            .expect("POST", &format!("{}/orders", self.orders), Some(body), 201)
            .await?;
        field_i64(&o, "id")
    }

    /// [`Mall::place_order`] as a patient client does it: a 503 (orders busy: too many
    /// requests or too many pending orders) is retried a second later, as its `Retry-After: 1`
    /// says, for up to two minutes. Returns the id and how many 503s it was answered first.
    pub async fn place_order_retrying(&self, product_id: i64, quantity: i64) -> Check<(i64, u32)> {
        let body = order_body(product_id, quantity);
        let url = format!("{}/orders", self.orders);
        let mut refused = 0;
        loop {
            let (status, value) = self.call("POST", &url, Some(body.clone())).await?;
            match status {
                201 => return Ok((field_i64(&value, "id")?, refused)),
                503 if refused < 120 => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                _ => return Err(format!("POST {url}: expected 201, got {status} {value}")),
            }
        }
    }

    /// An order as orders shows it.
    pub async fn order(&self, id: i64) -> Check<Value> {
        self.expect("GET", &format!("{}/orders/{id}", self.orders), None, 200)
            .await
    }

    /// Waits until an order reaches `state` and returns it.
    pub async fn wait_order_state(&self, id: i64, state: &str) -> Check<Value> {
        eventually(
            &format!("order {id} reaches {state}"),
            Duration::from_secs(30),
            || async move {
                let o = self.order(id).await?;
                if o["state"] == state {
                    Ok(o)
                } else {
                    Err(format!("order {id} is {o}"))
                }
            },
        )
        .await
    }

    /// `(stock, reserved)` of a product in products.
    pub async fn stock(&self, product_id: i64) -> Check<(i64, i64)> {
        let p = self
            .expect(
                "GET",
                &format!("{}/products/{product_id}", self.products),
                None,
                200,
            )
            .await?;
        Ok((field_i64(&p, "stock")?, field_i64(&p, "reserved")?))
    }

    /// Waits until a product's stock and reserved units are as expected.
    pub async fn wait_stock(&self, product_id: i64, expected: (i64, i64)) -> Check {
        eventually(
            &format!("product {product_id} has (stock, reserved) = {expected:?}"),
            Duration::from_secs(30),
            || async move {
                let got = self.stock(product_id).await?;
                if got == expected {
                    Ok(())
                } else {
                    Err(format!("(stock, reserved) is {got:?}"))
                }
            },
        )
        .await
    }

    /// The delivery of an order.
    pub async fn delivery_of(&self, order_id: i64) -> Check<Value> {
        let list = self
            .expect(
                "GET",
                &format!("{}/deliveries?orderId={order_id}", self.delivery),
                None,
                200,
            )
            .await?;
        list.as_array()
            .and_then(|l| l.first().cloned())
            .ok_or_else(|| format!("no delivery for order {order_id}"))
    }

    /// Waits until an order's delivery reaches `state`.
    pub async fn wait_delivery_state(&self, order_id: i64, state: &str) -> Check<Value> {
        eventually(
            &format!("delivery of order {order_id} reaches {state}"),
            Duration::from_secs(30),
            || async move {
                let d = self.delivery_of(order_id).await?;
                if d["deliveryState"] == state {
                    Ok(d)
                } else {
                    Err(format!("delivery is {d}"))
                }
            },
        )
        .await
    }

    /// Waits until an order's delivery is confirmed by OrderCompleted (the courier may
    /// complete it from then on) and returns it.
    pub async fn wait_delivery_confirmed(&self, order_id: i64) -> Check<Value> {
        eventually(
            "the delivery is confirmed by OrderCompleted",
            Duration::from_secs(30),
            || async move {
                let d = self.delivery_of(order_id).await?;
                if d["orderConfirmed"] == true {
                    Ok(d)
                } else {
                    Err(d.to_string())
                }
            },
        )
        .await
    }

    /// `GET /orders/{id}/events`: the event types in order.
    pub async fn timeline(&self, order_id: i64) -> Check<Vec<Value>> {
        let h = self
            .expect(
                "GET",
                &format!("{}/orders/{order_id}/events", self.orders),
                None,
                200,
            )
            .await?;
        h.as_array()
            .cloned()
            .ok_or_else(|| format!("timeline is not a list: {h}"))
    }

    /// Every event on the saga topic whose `correlationId` is this order, in partition order;
    /// fails if one of them is not keyed by the order id.
    pub async fn topic_events_of(&self, order_id: i64) -> Check<Vec<Value>> {
        let id = order_id.to_string();
        let mut events = Vec::new();
        for m in read_topic(&self.brokers, &self.topic).await? {
            if m.value["correlationId"] != id.as_str() {
                continue;
            }
            if m.key.as_deref() != Some(id.as_str()) {
                return Err(format!(
                    "event of order {id} has key {:?}: {}",
                    m.key, m.raw
                ));
            }
            events.push(m.value);
        }
        Ok(events)
    }

    /// This mall, knowing every instance of each service (they share the partitions, so
    /// [`Mall::wait_quiet`] asks them all).
    pub fn with_instances(mut self, instances: Vec<ServiceInstances>) -> Self {
        self.instances = instances;
        self
    }

    /// Waits until the mall is [`quiet`]: nothing in any outbox, the topic read to its end
    /// by every service. Checks that something did not happen (twice) come after it.
    pub async fn wait_quiet(&self) -> Check {
        wait_quiet(
            &self.http,
            &self.brokers,
            &self.topic,
            &self.instances,
            Duration::from_secs(30),
        )
        .await
    }

    /// Waits until every service answers `/health` with 200.
    pub async fn wait_healthy(&self) -> Check {
        for base in [&self.orders, &self.products, &self.delivery] {
            eventually(
                &format!("{base}/health answers 200"),
                Duration::from_secs(60),
                || async move {
                    self.expect("GET", &format!("{base}/health"), None, 200)
                        .await
                        .map(|_| ())
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// The body of the tests' `POST /orders`.
fn order_body(product_id: i64, quantity: i64) -> Value {
    json!({ "productId": product_id, "quantity": quantity, "customerId": "e2e@12st.mall",
            "customerName": "E2E", "customerAddr": "Seoul" })
}

/// Reads a JSON integer field or says which is missing.
pub fn field_i64(value: &Value, name: &str) -> Check<i64> {
    value[name]
        .as_i64()
        .ok_or_else(|| format!("no integer {name:?} in {value}"))
}

/// Retries `check` every 100 ms until it passes or `timeout` runs out; the error then says what
/// was awaited and what was last seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Check<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Check<T>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if start.elapsed() > timeout => {
                return Err(format!(
                    "timed out after {timeout:?} waiting until {what}; last seen: {last}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Reads a whole topic from the beginning up to its current end.
pub async fn read_topic(brokers: &str, topic: &str) -> Check<Vec<TopicMessage>> {
    read_topic_within(brokers, topic, Duration::from_secs(20)).await
}

/// [`read_topic`] with a deadline for reaching the end. A topic whose metadata has an error
/// (one that does not exist yet, say) is an error, never an empty list: an empty read would
/// pass every "at most once" check.
pub async fn read_topic_within(
    brokers: &str,
    topic: &str,
    deadline: Duration,
) -> Check<Vec<TopicMessage>> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic_blocking(&brokers, &topic, deadline))
        .await
        .map_err(|e| e.to_string())?
}

fn read_topic_blocking(brokers: &str, topic: &str, deadline: Duration) -> Check<Vec<TopicMessage>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "e2e-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| format!("reader: {e}"))?;
    let timeout = Duration::from_secs(10);
    let partitions = partitions_of(&consumer, topic, timeout)?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = std::collections::HashMap::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| format!("watermarks: {e}"))?;
        if high > low {
            assignment
                .add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
            remaining.insert(*p, high);
        }
    }
    let mut messages = Vec::new();
    if remaining.is_empty() {
        return Ok(messages);
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assign: {e}"))?;
    let end = Instant::now() + deadline;
    while !remaining.is_empty() {
        if Instant::now() > end {
            return Err(format!(
                "reading {topic} did not reach its end; left: {remaining:?}"
            ));
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = result.map_err(|e| format!("reading {topic}: {e}"))?;
        let raw = m
            .payload()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let headers = kafka::replay::headers_of(&m);
        messages.push(TopicMessage {
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: serde_json::from_str(&raw).unwrap_or(Value::Null),
            raw,
            headers,
        });
        if remaining
            .get(&m.partition())
            .is_some_and(|high| m.offset() + 1 >= *high)
        {
            remaining.remove(&m.partition());
        }
    }
    Ok(messages)
}

/// The partitions of `topic`; an error when its metadata has one (it does not exist, say) or
/// names no partition.
fn partitions_of(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Check<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("metadata of {topic}: the topic is not listed"))?;
    if let Some(e) = found.error() {
        return Err(format!("metadata of {topic}: {e:?}"));
    }
    let partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(format!("metadata of {topic}: no partitions"));
    }
    Ok(partitions)
}

/// The high watermark (the next offset) of every partition of `topic`.
pub async fn topic_ends(brokers: &str, topic: &str) -> Check<std::collections::BTreeMap<i32, i64>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .map_err(|e| format!("reader: {e}"))?;
        let timeout = Duration::from_secs(10);
        let mut ends = std::collections::BTreeMap::new();
        for p in partitions_of(&consumer, &topic, timeout)? {
            let (_, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
            ends.insert(p, high);
        }
        Ok(ends)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// One service as [`quiet`] reads it: its name and the base URL of each of its instances.
pub type ServiceInstances = (&'static str, Vec<String>);

/// The value of the sample whose name and labels are exactly `series` in a Prometheus text.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Whether the mall is quiet: `Ok` when no service has an event waiting in its outbox and,
/// for every service, every partition of `topic` was read to its end by one of its instances
/// (position ≥ high watermark, from `/health`) — between two reads of the topic's ends that
/// agree, so nothing was published meanwhile. Otherwise what is still moving. Checks that
/// count events, or that nothing (more) happened, judge only a quiet mall: before it, a copy
/// or a late effect may still be on its way.
pub async fn quiet(
    http: &reqwest::Client,
    brokers: &str,
    topic: &str,
    services: &[ServiceInstances],
) -> Check {
    let ends = topic_ends(brokers, topic).await?;
    let get = |url: String| async move {
        let response = http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        response.text().await.map_err(|e| format!("GET {url}: {e}"))
    };
    for (service, bases) in services {
        // An instance that does not answer holds nothing here: its partitions show missing.
        let mut positions = std::collections::BTreeMap::<i32, i64>::new();
        for base in bases {
            let Ok(text) = get(format!("{base}/health")).await else {
                continue;
            };
            let health: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let held = health["consumer"]["partitions"].as_object().cloned();
            for (partition, p) in held.unwrap_or_default() {
                if let (Ok(partition), Some(at)) = (partition.parse(), p["position"].as_i64()) {
                    let seen = positions.entry(partition).or_insert(at);
                    *seen = (*seen).max(at);
                }
            }
        }
        for (partition, end) in &ends {
            match positions.get(partition) {
                Some(at) if at >= end => {}
                Some(at) => {
                    return Err(format!(
                        "{service} has read {topic}/{partition} to {at} of {end}"
                    ));
                }
                None => return Err(format!("no {service} instance reads {topic}/{partition}")),
            }
        }
        // The outbox is the service's database's: any instance that answers tells.
        let mut pending = None;
        for base in bases {
            if let Ok(text) = get(format!("{base}/metrics")).await {
                pending = metric_sample(&text, "mall_outbox_pending_rows");
                if pending.is_some() {
                    break;
                }
            }
        }
        match pending {
            Some(0.0) => {}
            Some(n) => return Err(format!("{service} has {n} event(s) in its outbox")),
            None => return Err(format!("no {service} instance shows its outbox")),
        }
    }
    let again = topic_ends(brokers, topic).await?;
    if again != ends {
        return Err(format!("{topic} grew from {ends:?} to {again:?}"));
    }
    Ok(())
}

/// Waits until [`quiet`], for at most `within`.
pub async fn wait_quiet(
    http: &reqwest::Client,
    brokers: &str,
    topic: &str,
    services: &[ServiceInstances],
    within: Duration,
) -> Check {
    eventually(
        "the mall is quiet (outboxes empty, topic read to its end)",
        within,
        || quiet(http, brokers, topic, services),
    )
    .await
}

/// Publishes a raw message to a topic (to inject malformed input).
pub async fn publish_raw(brokers: &str, topic: &str, key: &str, payload: &str) -> Check {
    publish_raw_bytes(brokers, topic, key, payload.as_bytes()).await
}

/// Publishes raw bytes to a topic (to inject malformed input of any size).
pub async fn publish_raw_bytes(brokers: &str, topic: &str, key: &str, payload: &[u8]) -> Check {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "10000000")
        .create()
        .map_err(|e| e.to_string())?;
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| format!("publishing to {topic}: {e}"))
}

/// Republishes every message of the topic once more (marked with a `replayed` header so it is
/// not copied again): with it running, every event reaches every service twice.
pub async fn replay_everything_twice(
    brokers: String,
    topic: String,
    stop: tokio_util::sync::CancellationToken,
) {
    use rdkafka::consumer::StreamConsumer;
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    let consumer: StreamConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "e2e-replayer")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "5")
        .create()
    {
        Ok(c) => c,
        Err(e) => return eprintln!("replayer: {e}"),
    };
    let producer: FutureProducer = match ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
    {
        Ok(p) => p,
        Err(e) => return eprintln!("replayer: {e}"),
    };
    if let Err(e) = consumer.subscribe(&[&topic]) {
        return eprintln!("replayer: {e}");
    }
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            m = consumer.recv() => m,
        };
        let Ok(m) = message else { continue };
        let replayed = m
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == "replayed"));
        if replayed {
            continue;
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: "replayed",
            value: Some("1"),
        });
        let mut record = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        if let Err((e, _)) = producer.send(record, Duration::from_secs(10)).await {
            eprintln!("replayer: {e}");
        }
    }
}

/// The three services started in this process against `brokers`, each on port 0 with its own
/// temporary SQLite database — or, when `TEST_POSTGRES_URL` names a PostgreSQL server, its own
/// fresh database there ([`pg::fresh_database`]).
pub struct InProcessMall {
    /// The client view.
    pub mall: Mall,
    _data: tempfile::TempDir,
}

/// Starts orders, products and delivery in-process and waits until they are healthy and orders'
/// replica knows the seeded catalog.
pub async fn spawn_in_process(brokers: &str, topic: &str) -> Check<InProcessMall> {
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    let postgres = std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let mut databases = std::collections::HashMap::new();
    for service in [
        events::Service::Orders,
        events::Service::Products,
        events::Service::Delivery,
    ] {
        let url = match &postgres {
            Some(server) => {
                pg::fresh_database(server, &pg::unique_name(&format!("e2e_{service}")))?
            }
            None => data
                .path()
                .join(format!("{service}.db"))
                .to_string_lossy()
                .into_owned(),
        };
        databases.insert(service.as_str(), url);
    }
    let settings = |service: events::Service| kafka::ServiceSettings {
        host: "127.0.0.1".into(),
        port: 0,
        database_url: databases[service.as_str()].clone(),
        kafka: kafka::KafkaSettings {
            partitions: 3,
            session_timeout: Duration::from_secs(6),
            fetch_wait_max: Duration::from_millis(10),
            ..kafka::KafkaSettings::new(brokers, topic, service.as_str())
        },
        retention: kafka::RetentionSettings::default(),
        access: kafka::access::AccessSettings::parse("127.0.0.1", "", "")
            .expect("no lists to parse"),
        tokens: kafka::auth::Tokens::default(),
        max_connections_per_address: kafka::connections::DEFAULT_MAX_PER_ADDRESS,
    };
    let products = products::build(&products::Settings {
        service: settings(events::Service::Products),
        seed_catalog: true,
    })
    .await
    .map_err(|e| format!("products: {e}"))?;
    let orders = orders::build(&orders::Settings {
        service: settings(events::Service::Orders),
        saga_timeout: Duration::from_secs(30),
        order_history: Duration::from_secs(30 * 24 * 3600),
        max_pending: orders::startup::MAX_PENDING_DEFAULT,
    })
    .await
    .map_err(|e| format!("orders: {e}"))?;
    let delivery = delivery::build(&settings(events::Service::Delivery))
        .await
        .map_err(|e| format!("delivery: {e}"))?;
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let mall = Mall::new(
        url(orders.port()),
        url(products.port()),
        url(delivery.port()),
        brokers.to_owned(),
        topic.to_owned(),
    );
    for host in [orders, products, delivery] {
        tokio::spawn(host.run_until_stopped(std::future::pending()));
    }
    mall.wait_healthy().await?;
    let m = mall.clone();
    eventually(
        "orders' replica knows the seeded catalog",
        Duration::from_secs(30),
        || {
            let m = m.clone();
            async move {
                let list = m
                    .expect("GET", &format!("{}/products", m.orders), None, 200)
                    .await?;
                if list.as_array().is_some_and(|l| l.len() >= 5) {
                    Ok(())
                } else {
                    Err(list.to_string())
                }
            }
        },
    )
    .await?;
    Ok(InProcessMall { mall, _data: data })
}
