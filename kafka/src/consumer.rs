//! The consumer loop every service runs: decode, apply exactly once, then store the offset.
//!
//! Offsets are stored only after the event's transaction committed
//! (`enable.auto.offset.store=false`), so a crash at any point redelivers the event and the
//! inbox absorbs the repeat. A message that cannot be decoded or applied is parked on
//! `<topic>.DLT` with the reason and the loop goes on; a transient failure (a busy database) is
//! retried, never parked.

use crate::db::Database;
use crate::inbox::{self, Applied, Reactor};
use crate::settings::KafkaSettings;
use events::Decoded;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Logs partition assignments and commit failures, which are otherwise invisible.
pub struct RebalanceLogger {
    group: String,
}

impl ClientContext for RebalanceLogger {}

impl ConsumerContext for RebalanceLogger {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let revoked: Vec<i32> = partitions
                .elements()
                .iter()
                .map(|p| p.partition())
                .collect();
            log::info!(
                "consumer group {}: partitions {revoked:?} revoked",
                self.group
            );
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            let assigned: Vec<i32> = partitions
                .elements()
                .iter()
                .map(|p| p.partition())
                .collect();
            log::info!(
                "consumer group {}: assigned partitions {assigned:?}",
                self.group
            );
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            log::warn!("consumer group {}: offset commit failed: {e}", self.group);
        }
    }
}

/// The consumer type every service uses.
pub type SagaConsumer = StreamConsumer<RebalanceLogger>;

/// A consumer in the service's stable group that stores offsets only when told to.
pub fn create_consumer(settings: &KafkaSettings) -> KafkaResult<SagaConsumer> {
    let context = RebalanceLogger {
        group: settings.group_id.clone(),
    };
    let consumer: SagaConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            settings.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 4)
                .max(100)
                .to_string(),
        )
        .set(
            "fetch.wait.max.ms",
            settings.fetch_wait_max.as_millis().to_string(),
        )
        .set("socket.nagle.disable", "true")
        .create_with_context(context)?;
    consumer.subscribe(&[&settings.topic])?;
    Ok(consumer)
}

/// What happened to one message.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Applied, skipped or parked: the offset may move past it.
    Finished,
    /// Shutdown came while it was being retried: leave it for the next start.
    Interrupted,
}

/// The loop that feeds the topic to a service's [`Reactor`].
pub struct EventConsumer {
    consumer: SagaConsumer,
    dead_letters: FutureProducer,
    dead_letter_topic: String,
    group: String,
    db: Database,
    reactor: Arc<dyn Reactor>,
}

impl EventConsumer {
    /// Wires a subscribed consumer to the service's database and reactor.
    pub fn new(
        consumer: SagaConsumer,
        dead_letters: FutureProducer,
        settings: &KafkaSettings,
        db: Database,
        reactor: Arc<dyn Reactor>,
    ) -> Self {
        EventConsumer {
            consumer,
            dead_letters,
            dead_letter_topic: settings.dead_letter_topic(),
            group: settings.group_id.clone(),
            db,
            reactor,
        }
    }

    /// Consumes until `shutdown`; the event in hand is finished first, then offsets are
    /// committed synchronously.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                message = self.consumer.recv() => message,
            };
            match message {
                Ok(message) => {
                    if self.handle(&message, &shutdown).await == Outcome::Interrupted {
                        break;
                    }
                    if let Err(e) = self.consumer.store_offset_from_message(&message) {
                        log::warn!("cannot store offset {}: {e}", describe(&message));
                    }
                }
                Err(e) => {
                    log::warn!("consumer error: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => log::info!("consumer stopped; offsets committed"),
            // Nothing stored yet is not a failure.
            Err(e) => log::info!("consumer stopped; final commit: {e}"),
        }
    }

    async fn handle(&self, message: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> Outcome {
        let event = match events::decode(message.payload().unwrap_or_default()) {
            Ok(Decoded::Known(event)) => *event,
            Ok(Decoded::Unknown { event_type }) => {
                log::debug!(
                    "skipping unknown event type {event_type} at {}",
                    describe(message)
                );
                return Outcome::Finished;
            }
            Err(e) => return self.park(message, &e.to_string(), shutdown).await,
        };
        if !self.reactor.wants(&event) {
            return Outcome::Finished;
        }
        let mut attempt = 0u32;
        loop {
            let result = inbox::apply_once(&self.db, self.reactor.clone(), event.clone()).await;
            match result {
                Ok(Applied::Done(caused)) => {
                    log::debug!(
                        "applied {} {} -> {caused} event(s)",
                        event.event_type(),
                        event.event_id
                    );
                    return Outcome::Finished;
                }
                Ok(Applied::Duplicate) => {
                    log::info!(
                        "ignored redelivered {} {}",
                        event.event_type(),
                        event.event_id
                    );
                    return Outcome::Finished;
                }
                Err(e) if e.is_transient() => {
                    attempt += 1;
                    log::warn!(
                        "{} {} failed transiently (attempt {attempt}): {e}",
                        event.event_type(),
                        event.event_id
                    );
                    let backoff = Duration::from_millis(50 * u64::from(attempt.min(40)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Outcome::Interrupted,
                    }
                }
                Err(e) => {
                    let reason = format!(
                        "{} {} cannot be applied: {e}",
                        event.event_type(),
                        event.event_id
                    );
                    return self.park(message, &reason, shutdown).await;
                }
            }
        }
    }

    /// Puts a message on the dead-letter topic with the reason; retried until the broker
    /// acknowledges, so no message is dropped silently.
    async fn park(
        &self,
        message: &BorrowedMessage<'_>,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Outcome {
        log::error!(
            "parking {} on {}: {reason}",
            describe(message),
            self.dead_letter_topic
        );
        let payload = message.payload().unwrap_or_default();
        let letter = serde_json::json!({
            "reason": reason,
            "consumerGroup": self.group,
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "payload": String::from_utf8_lossy(payload),
            "parkedAt": chrono::Utc::now().to_rfc3339(),
        })
        .to_string();
        let key = message.key().unwrap_or_default();
        loop {
            let record = FutureRecord::to(&self.dead_letter_topic)
                .key(key)
                .payload(&letter);
            match self
                .dead_letters
                .send(record, Duration::from_secs(10))
                .await
            {
                Ok(_) => return Outcome::Finished,
                Err((e, _)) => {
                    log::warn!(
                        "cannot park message on {}: {e}; retrying",
                        self.dead_letter_topic
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return Outcome::Interrupted,
                    }
                }
            }
        }
    }
}

fn describe(message: &BorrowedMessage<'_>) -> String {
    format!(
        "{}[{}]@{}",
        message.topic(),
        message.partition(),
        message.offset()
    )
}
