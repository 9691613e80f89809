//! Reading the saga topic from its first offset to its end as it is now, partition by
//! partition in offset order: what a service's read model is rebuilt from. A client assigned
//! to every partition; nothing is committed to the broker.

use crate::consumer::{create_probe, partitions_of};
use crate::settings::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A message's headers as text pairs, in order (a value that is not UTF-8 is shown lossily).
pub fn headers_of(message: &impl Message) -> Vec<(String, String)> {
    message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its value (empty for none).
    pub payload: Vec<u8>,
    /// Its Kafka headers (name, value as lossy UTF-8).
    pub headers: Vec<(String, String)>,
}

impl Replayed {
    /// The value of header `name`, if it has one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A consumer that reads partitions it is assigned and never joins a group or commits
/// (`purpose` names its group id, which librdkafka wants also for `assign`), so the
/// service's own group and the positions shown on the broker stay untouched.
fn reader(settings: &KafkaSettings, purpose: &str) -> rdkafka::error::KafkaResult<BaseConsumer> {
    let group = format!("{}-{purpose}", settings.group_id);
    settings
        .client_config_with(
            purpose,
            &[
                ("group.id", group.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("allow.auto.create.topics", "false"),
            ],
        )
        .create()
}

/// Every message of `settings.topic` from each partition's first offset to its end when the
/// call began, in offset order per partition, and those ends (the next offset to read).
/// Blocking: run it on a blocking thread. Fails when the broker does not deliver them within
/// `within`.
pub fn read_from_start(
    settings: &KafkaSettings,
    within: Duration,
) -> Result<(Vec<Replayed>, BTreeMap<i32, i64>), String> {
    read_from(settings, &BTreeMap::new(), within)
}

/// [`read_from_start`], but each partition in `from` from that offset (the next one to read,
/// as a consumer stores it; never before the partition's first offset).
pub fn read_from(
    settings: &KafkaSettings,
    from: &BTreeMap<i32, i64>,
    within: Duration,
) -> Result<(Vec<Replayed>, BTreeMap<i32, i64>), String> {
    let topic = &settings.topic;
    let probe: BaseConsumer = create_probe(settings).map_err(|e| e.to_string())?;
    let client = reader(settings, "replay").map_err(|e| e.to_string())?;
    let mut ends = BTreeMap::new();
    let mut next = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions_of(&probe, topic)? {
        let (low, high) = probe
            .fetch_watermarks(topic, partition, Duration::from_secs(5))
            .map_err(|e| format!("watermarks of {topic}[{partition}]: {e}"))?;
        ends.insert(partition, high);
        let first = from.get(&partition).map_or(low, |&stored| stored.max(low));
        if high > first {
            next.insert(partition, first);
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(first))
                .map_err(|e| e.to_string())?;
        }
    }
    client.assign(&assignment).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut read = Vec::new();
    while next.iter().any(|(p, n)| *n < ends[p]) {
        if started.elapsed() > within {
            return Err(format!(
                "{topic}: read up to {next:?} of {ends:?} within {within:?}"
            ));
        }
        let Some(message) = client.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.map_err(|e| format!("reading {topic}: {e}"))?;
        let (partition, offset) = (message.partition(), message.offset());
        if offset >= ends[&partition] {
            continue; // written after the call began
        }
        next.insert(partition, offset + 1);
        let headers = headers_of(&message);
        read.push(Replayed {
            partition,
            offset,
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    Ok((read, ends))
}
