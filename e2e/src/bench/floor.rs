//! The broker's floor: the fastest a single hop through the broker can be. One small message
//! is produced (acks=all, no linger) and read back by a group-less consumer that fetches with
//! the services' `fetch.wait.max.ms`, one round trip after the other. A saga has at least two
//! such hops in a row (OrderPlaced → StockDecreased/DeliveryStarted → OrderCompleted).

use super::stats::Spread;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// The topic the floor is measured on, apart from the saga's.
pub const FLOOR_TOPIC: &str = "bench.floor";
/// Unmeasured round trips first, so connections and metadata are in place.
const WARM_UP: usize = 5;
/// Alongside a load, one round trip per this at most: back to back they were thousands a
/// second, a load of their own that took most of a core of the broker's CPU the bench charges
/// to the sagas.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// `n` sequential produce → consume round trips on [`FLOOR_TOPIC`], in milliseconds.
pub async fn broker_floor(brokers: &str, fetch_wait_ms: u64, n: usize) -> Result<Spread, String> {
    let probe = Probe::start(brokers, fetch_wait_ms).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(probe.round_trip_ms().await?);
    }
    Ok(Spread::of(samples))
}

/// A producer and a consumer of [`FLOOR_TOPIC`], warmed up: measures the floor alone, or
/// alongside a load (the broker's own latency as the load makes it).
pub struct Probe {
    producer: FutureProducer,
    consumer: StreamConsumer,
    sent: std::sync::atomic::AtomicUsize,
}

impl Probe {
    /// Creates the topic if needed and runs the unmeasured round trips.
    pub async fn start(brokers: &str, fetch_wait_ms: u64) -> Result<Probe, String> {
        create_topic(brokers).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .map_err(|e| format!("floor producer: {e}"))?;
        let consumer = consumer_at_end(brokers, fetch_wait_ms).await?;
        let probe = Probe {
            producer,
            consumer,
            sent: Default::default(),
        };
        for _ in 0..WARM_UP {
            probe.round_trip_ms().await?;
        }
        Ok(probe)
    }

    /// One produce → consume round trip, ms.
    pub async fn round_trip_ms(&self) -> Result<f64, String> {
        let marker = self
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let took = round_trip(&self.producer, &self.consumer, &marker).await?;
        Ok(took.as_secs_f64() * 1000.0)
    }

    /// Round trips from `from` until `to`, one per [`SAMPLE_EVERY`] at most, ms.
    pub async fn round_trips_between(&self, from: Instant, to: Instant) -> Result<Spread, String> {
        tokio::time::sleep_until(from.into()).await;
        let mut samples = Vec::new();
        while Instant::now() < to {
            let next = Instant::now() + SAMPLE_EVERY;
            samples.push(self.round_trip_ms().await?);
            tokio::time::sleep_until(next.into()).await;
        }
        Ok(Spread::of(samples))
    }
}

/// Creates the one-partition floor topic; one that exists already is fine.
async fn create_topic(brokers: &str) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("floor admin: {e}"))?;
    let topic = NewTopic::new(FLOOR_TOPIC, 1, TopicReplication::Fixed(1));
    admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .map_err(|e| format!("creating {FLOOR_TOPIC}: {e}"))?;
    // A per-topic error (already exists) is fine: the metadata wait below decides.
    Ok(())
}

/// A group-less consumer of partition 0 of the floor topic, at its current end.
async fn consumer_at_end(brokers: &str, fetch_wait_ms: u64) -> Result<StreamConsumer, String> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // librdkafka wants a group id even for assign(); it never joins: no subscribe, no commit.
        .set(
            "group.id",
            format!("saga-bench-floor-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .create()
        .map_err(|e| format!("floor consumer: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let high = loop {
        match consumer.fetch_watermarks(FLOOR_TOPIC, 0, Duration::from_secs(5)) {
            Ok((_, high)) => break high,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{FLOOR_TOPIC} watermarks: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(FLOOR_TOPIC, 0, Offset::Offset(high))
        .map_err(|e| e.to_string())?;
    consumer
        .assign(&list)
        .map_err(|e| format!("floor assign: {e}"))?;
    Ok(consumer)
}

/// Produces `marker` and waits until the consumer reads it back.
async fn round_trip(
    producer: &FutureProducer,
    consumer: &StreamConsumer,
    marker: &str,
) -> Result<Duration, String> {
    let started = Instant::now();
    producer
        .send(
            FutureRecord::to(FLOOR_TOPIC).key(marker).payload(marker),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| format!("floor produce: {e}"))?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .map_err(|_| format!("floor: message {marker} not read back within 10 s"))?
            .map_err(|e| format!("floor consume: {e}"))?;
        if message.payload() == Some(marker.as_bytes()) {
            return Ok(started.elapsed());
        }
    }
}
