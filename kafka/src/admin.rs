//! Topic administration: the saga topic and its dead-letter topic exist before anyone uses them.

use crate::settings::KafkaSettings;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::time::Duration;

/// Creates the saga topic (with `settings.partitions`) and `<topic>.DLT` when missing.
pub async fn ensure_topics(settings: &KafkaSettings) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()?;
    let dlt = settings.dead_letter_topic();
    let topics = [
        NewTopic::new(&settings.topic, settings.partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&dlt, 1, TopicReplication::Fixed(1)),
    ];
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
