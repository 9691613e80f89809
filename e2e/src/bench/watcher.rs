//! Reads the saga topic while the load runs and notes, per order, the timestamps orders gave
//! OrderPlaced and the terminal event (OrderCompleted or OrderCancelled), and those of the
//! two answers in between (products', delivery's), to split the saga into its hops. Group-less: every
//! partition is assigned at the end offset taken before the load starts, so it sees exactly
//! the run's events and no consumer group moves.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the topic said about one order, in Unix-epoch milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Times {
    /// `timestamp` of OrderPlaced.
    pub placed_ms: Option<i64>,
    /// The Kafka timestamp of the OrderPlaced message: when orders' relay handed it to its
    /// producer (librdkafka's CreateTime), so a hop splits into relay and transport.
    pub placed_sent_ms: Option<i64>,
    /// `timestamp` of products' answer (StockDecreased or ProductOutOfStock), stamped by
    /// products: the first hop.
    pub stock_ms: Option<i64>,
    /// `timestamp` of DeliveryStarted, stamped by delivery: the first hop, run alongside.
    pub delivery_ms: Option<i64>,
    /// `timestamp` of the first OrderCompleted or OrderCancelled.
    pub terminal_ms: Option<i64>,
    /// True when that terminal event was OrderCancelled.
    pub cancelled: bool,
}

/// The envelope fields the bench needs; the rest of the event is skipped unparsed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Seen<'a> {
    event_type: &'a str,
    timestamp: &'a str,
    correlation_id: Option<&'a str>,
}

type Orders = Arc<Mutex<HashMap<i64, Times>>>;

/// A background reader of the saga topic; stop it with [`Watcher::stop`].
pub struct Watcher {
    orders: Orders,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn lock(orders: &Orders) -> MutexGuard<'_, HashMap<i64, Times>> {
    orders.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watcher {
    /// Assigns every partition of `topic` at its current end and starts reading (blocking:
    /// call it from a blocking task).
    pub fn start(brokers: &str, topic: &str, fetch_wait_ms: u64) -> Result<Watcher, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // librdkafka wants a group id even for assign(); it never joins: no subscribe, no commit.
            .set(
                "group.id",
                format!("saga-bench-reader-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
            .create()
            .map_err(|e| format!("topic reader: {e}"))?;
        consumer
            .assign(&end_offsets(&consumer, topic)?)
            .map_err(|e| format!("topic reader: assign: {e}"))?;
        let orders: Orders = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (orders, stop) = (orders.clone(), stop.clone());
            std::thread::spawn(move || read_until_stopped(&consumer, &orders, &stop))
        };
        Ok(Watcher {
            orders,
            stop,
            thread: Some(thread),
        })
    }

    /// What has been seen of these orders so far (an order not seen yet is all `None`).
    pub fn times_of(&self, ids: &[i64]) -> Vec<Times> {
        let orders = lock(&self.orders);
        ids.iter()
            .map(|id| orders.get(id).copied().unwrap_or_default())
            .collect()
    }

    /// How many of these orders have reached a terminal event.
    pub fn terminal_count(&self, ids: &[i64]) -> usize {
        let orders = lock(&self.orders);
        ids.iter()
            .filter(|id| orders.get(id).is_some_and(|t| t.terminal_ms.is_some()))
            .count()
    }

    /// Stops the reader thread and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every partition of `topic` at its high watermark; waits up to 30 s for the topic to exist
/// (the services create it as they start).
fn end_offsets(consumer: &BaseConsumer, topic: &str) -> Result<TopicPartitionList, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match kafka::consumer::partitions_of(consumer, topic) {
            Ok(partitions) => {
                let marks = kafka::consumer::watermarks(consumer, topic, &partitions)?;
                let mut list = TopicPartitionList::new();
                for (p, (_, high)) in marks {
                    list.add_partition_offset(topic, p, Offset::Offset(high))
                        .map_err(|e| e.to_string())?;
                }
                return Ok(list);
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn read_until_stopped(consumer: &BaseConsumer, orders: &Orders, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100))
            && let Some(payload) = message.payload()
        {
            note(orders, payload, message.timestamp().to_millis());
        }
    }
}

/// Records OrderPlaced, products' and delivery's answers to it and the first terminal event
/// of an order; ignores everything else.
fn note(orders: &Orders, payload: &[u8], sent_ms: Option<i64>) {
    let Ok(seen) = serde_json::from_slice::<Seen>(payload) else {
        return;
    };
    let noted = matches!(
        seen.event_type,
        "OrderPlaced"
            | "StockDecreased"
            | "ProductOutOfStock"
            | "DeliveryStarted"
            | "OrderCompleted"
            | "OrderCancelled"
    );
    if !noted {
        return;
    }
    let Some(id) = seen.correlation_id.and_then(|c| c.parse::<i64>().ok()) else {
        return;
    };
    let Ok(at) = chrono::DateTime::parse_from_rfc3339(seen.timestamp) else {
        return;
    };
    let at = at.timestamp_millis();
    let mut orders = lock(orders);
    let times = orders.entry(id).or_default();
    match seen.event_type {
        "OrderPlaced" => {
            times.placed_ms = Some(at);
            times.placed_sent_ms = sent_ms;
        }
        "StockDecreased" | "ProductOutOfStock" => {
            times.stock_ms.get_or_insert(at);
        }
        "DeliveryStarted" => {
            times.delivery_ms.get_or_insert(at);
        }
        terminal if times.terminal_ms.is_none() => {
            times.terminal_ms = Some(at);
            times.cancelled = terminal == "OrderCancelled";
        }
        _ => {}
    }
}
