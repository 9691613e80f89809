//! The idempotent producer the outbox relay uses (saga events and dead letters alike).

use crate::settings::KafkaSettings;
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;

/// An idempotent producer with `acks=all`: retries never duplicate or reorder a partition.
///
/// `message.timeout.ms=0` (no timeout): a message queued during a broker outage waits for the
/// broker instead of timing out. A timed-out message is what leaves a gap (rows 1, 4, 5
/// written; 2, 3 not) that a resend would fill out of order. The relay's own waits are
/// cancellable, so a stop stays bounded.
pub fn create_producer(settings: &KafkaSettings) -> KafkaResult<FutureProducer> {
    settings
        .client_config_with(
            "producer",
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "1"),
                ("message.timeout.ms", "0"),
                // Back within a second of a broker restart (the default backs off up to 10 s).
                ("reconnect.backoff.max.ms", "1000"),
                ("socket.nagle.disable", "true"),
                // The topics exist with their settings (admin::ensure_topics); a typo must not
                // create another one with the broker's defaults.
                ("allow.auto.create.topics", "false"),
            ],
        )
        .create()
}
