//! Topic administration: the saga topic and its dead-letter topic exist before anyone uses them.

use crate::settings::KafkaSettings;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::time::Duration;

/// Creates the saga topic (with `settings.partitions`) and `<topic>.DLT` when missing.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()?;
    let dlt = settings.dead_letter_topic();
    // Ask first: creating only what is missing also works on brokers without CreateTopics.
    let brokers = settings.brokers.clone();
    let existing: Vec<String> = tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let metadata = probe.fetch_metadata(None, Duration::from_secs(10))?;
        Ok::<_, KafkaError>(
            metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .collect(),
        )
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    let topics: Vec<NewTopic<'_>> = [
        NewTopic::new(
            &settings.topic,
            settings.partitions,
            TopicReplication::Fixed(1),
        ),
        NewTopic::new(&dlt, 1, TopicReplication::Fixed(1)),
    ]
    .into_iter()
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
            Ok(name) => log::info!("created topic {name}"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    log::error!("cannot create topic {name}: {code}");
                });
            }
        }
    }
    Ok(())
}
