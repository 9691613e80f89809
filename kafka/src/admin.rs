//! Topic administration: the saga topic and its dead-letter topic exist, with their settings,
//! before anyone uses them.

use crate::settings::KafkaSettings;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why the topics could not be made sure of: the request's error and, when the broker turned
/// the client away (wrong credentials, a TLS or protocol mismatch), what it said — a metadata
/// request alone only reports "transport failure".
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", .refused.as_deref().map(|r| format!("; the connection to the broker was refused: {r}")).unwrap_or_default())]
pub struct TopicsError {
    /// The failed request.
    pub error: KafkaError,
    /// The client's authentication or security error, if it had one.
    pub refused: Option<String>,
}

/// Remembers the last authentication or security error a client saw.
#[derive(Clone, Default)]
struct RefusalContext {
    refused: Arc<Mutex<Option<String>>>,
}

impl ClientContext for RefusalContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let refusal = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
                    | RDKafkaErrorCode::UnsupportedSASLMechanism
                    | RDKafkaErrorCode::IllegalSASLState
            )
        );
        if refusal {
            *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
        } else {
            log::debug!("topic admin: {error}: {reason}");
        }
    }
}

impl ConsumerContext for RefusalContext {}

/// How long [`ensure_topics`] keeps retrying errors a broker gives while it starts.
const STARTING_BROKER_GRACE: Duration = Duration::from_secs(30);

/// Creates the saga topic (`settings.partitions`, with the replication factor,
/// `min.insync.replicas`, `retention.ms` and `segment.ms` of `settings.topic_config`) and
/// `<topic>.DLT` (one partition, same settings) when missing. An existing topic is left as
/// it is. Errors of a broker still starting (no broker registered yet, a controller not
/// elected) are retried for up to 30 s.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), TopicsError> {
    let context = RefusalContext::default();
    let started = Instant::now();
    loop {
        match try_ensure_topics(settings, &context).await {
            Err(KafkaError::AdminOp(code))
                if started.elapsed() < STARTING_BROKER_GRACE && starting_broker(code) =>
            {
                log::info!("broker not ready to create topics yet ({code}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => {
                return other.map_err(|error| TopicsError {
                    error,
                    refused: context
                        .refused
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(),
                });
            }
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

async fn try_ensure_topics(
    settings: &KafkaSettings,
    context: &RefusalContext,
) -> Result<(), KafkaError> {
    let admin: AdminClient<RefusalContext> = settings
        .client_config("admin")
        .create_with_context(context.clone())?;
    let dlt = settings.dead_letter_topic();
    // Ask first: creating only what is missing also works on brokers without CreateTopics.
    let (probe_settings, probe_context) = (settings.clone(), context.clone());
    let existing: Vec<String> = tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer<RefusalContext> = probe_settings
            .client_config("admin")
            .create_with_context(probe_context)?;
        let metadata = probe
            .fetch_metadata(None, Duration::from_secs(10))
            .inspect_err(|_| {
                // A client's errors reach its context only when it is polled.
                for _ in 0..5 {
                    let _ = probe.poll(Duration::from_millis(20));
                }
            })?;
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
