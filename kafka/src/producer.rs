//! Producers: the idempotent one the outbox relay and the dead-letter parking use.

use crate::settings::KafkaSettings;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;

/// An idempotent producer with `acks=all`: retries never duplicate or reorder a partition.
pub fn create_producer(settings: &KafkaSettings) -> KafkaResult<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000")
        .set("socket.nagle.disable", "true")
        .create()
}
