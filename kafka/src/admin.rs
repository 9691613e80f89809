//! Topic administration: the saga topic and its dead-letter topic exist, with their settings,
//! before anyone uses them.

use crate::settings::KafkaSettings;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::time::{Duration, Instant};

/// How long [`ensure_topics`] keeps retrying errors a broker gives while it starts.
const STARTING_BROKER_GRACE: Duration = Duration::from_secs(30);

/// Creates the saga topic (`settings.partitions`, with the replication factor,
/// `min.insync.replicas`, `retention.ms` and `segment.ms` of `settings.topic_config`) and
/// `<topic>.DLT` (one partition, same settings) when missing. An existing topic is left as
/// it is. Errors of a broker still starting (no broker registered yet, a controller not
/// elected) are retried for up to 30 s.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), KafkaError> {
    let started = Instant::now();
    loop {
        match try_ensure_topics(settings).await {
            Err(KafkaError::AdminOp(code))
                if started.elapsed() < STARTING_BROKER_GRACE && starting_broker(code) =>
            {
                log::info!("broker not ready to create topics yet ({code}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Errors a KRaft broker answers CreateTopics with while it starts.
fn starting_broker(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidReplicationFactor // "0 brokers registered"
            | RDKafkaErrorCode::NotController
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::LeaderNotAvailable
    )
}

async fn try_ensure_topics(settings: &KafkaSettings) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config("admin").create()?;
    let dlt = settings.dead_letter_topic();
    // Ask first: creating only what is missing also works on brokers without CreateTopics.
    let probe_settings = settings.clone();
    let existing: Vec<String> = tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = probe_settings.client_config("admin").create()?;
        let metadata = probe.fetch_metadata(None, Duration::from_secs(10))?;
        Ok::<_, KafkaError>(
            metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| t.name().to_owned())
                .collect(),
        )
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    let t = &settings.topic_config;
    let configs = t.configs();
    let replication = || TopicReplication::Fixed(t.replication_factor);
    let topics: Vec<NewTopic<'_>> = [
        NewTopic::new(&settings.topic, settings.partitions, replication()),
        NewTopic::new(&dlt, 1, replication()),
    ]
    .into_iter()
    .map(|topic| {
        configs
            .iter()
            .fold(topic, |topic, (name, value)| topic.set(name, value))
    })
    .filter(|t| !existing.iter().any(|name| name == t.name))
    .collect();
    if topics.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(name) => log::info!(
                "created topic {name} (replication factor {}, min.insync.replicas {}, \
                 retention.ms {}, segment.ms {})",
                t.replication_factor,
                t.min_insync_replicas,
                t.retention.as_millis(),
                t.segment.as_millis()
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    log::warn!("cannot create topic {name}: {code}");
                });
            }
        }
    }
    Ok(())
}
