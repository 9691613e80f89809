//! `mall-topic`: the topic tool of the 12st Mall, for brokers Debian's kcat cannot talk to.
//!
//! - `mall-topic watch [--order ID] [--dlt] [--from-now]`: follows the saga topic (or its
//!   dead-letter topic) from the beginning and prints each message as one JSON line, like
//!   `kafka-console-consumer --from-beginning`; `--order` keeps one order's events.
//! - `mall-topic ensure`: creates the topic and its `.DLT` if missing.
//! - `mall-topic ready [--timeout S]`: waits (5 s by default) until a metadata request answers
//!   with a registered broker, the scripts' test that a broker is up (an open port is not).
//!
//! Reads `KAFKA_BROKERS`, `KAFKA_TOPIC` and `KAFKA_PARTITIONS` like the services.

use kafka::KafkaSettings;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: mall-topic watch [--order ID] [--dlt] [--from-now] | mall-topic ensure | mall-topic ready [--timeout S]";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = match KafkaSettings::from_env("mall-topic") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("watch") => watch(&settings, &args[1..]).await,
        Some("ensure") => match kafka::admin::ensure_topics(&settings).await {
            Ok(()) => {
                let partitions = kafka::consumer::create_probe(&settings)
                    .map_err(|e| e.to_string())
                    .and_then(|p| kafka::consumer::partitions_of(&p, &settings.topic))
                    .map(|p| p.len().to_string())
                    .unwrap_or_else(|_| "?".into());
                println!(
                    "topics {0} ({partitions} partitions) and {0}.DLT exist on {1}",
                    settings.topic, settings.brokers
                );
                Ok(())
            }
            Err(e) => Err(format!("cannot ensure topics on {}: {e}", settings.brokers)),
        },
        Some("ready") => ready(&settings, &args[1..]),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits until the brokers answer a metadata request naming at least one broker.
fn ready(settings: &KafkaSettings, args: &[String]) -> Result<(), String> {
    let timeout = match args {
        [] => Duration::from_secs(5),
        [flag, secs] if flag == "--timeout" => secs
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("--timeout: a number of seconds, not {secs:?}"))?,
        _ => return Err(USAGE.to_string()),
    };
    let started = std::time::Instant::now();
    let probe: rdkafka::consumer::BaseConsumer = settings
        .client_config("mall-topic")
        .set("log_level", "2")
        .create()
        .map_err(|e| e.to_string())?;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let last = match probe.fetch_metadata(None, left.max(Duration::from_millis(100))) {
            Ok(m) if !m.brokers().is_empty() => {
                println!(
                    "{} broker(s) answer at {}",
                    m.brokers().len(),
                    settings.brokers
                );
                return Ok(());
            }
            Ok(_) => "no broker registered yet".to_owned(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= timeout {
            return Err(format!("no broker answers at {}: {last}", settings.brokers));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn watch(settings: &KafkaSettings, args: &[String]) -> Result<(), String> {
    let mut order = None;
    let mut topic = settings.topic.clone();
    let mut start = Offset::Beginning;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--order" => order = Some(rest.next().ok_or(USAGE)?.clone()),
            "--dlt" => topic = settings.dead_letter_topic(),
            "--from-now" => start = Offset::End,
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", "mall-topic-watch")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map_err(|e| format!("broker {} not reachable: {e}", settings.brokers))?;
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            assignment
                .add_partition_offset(&topic, p.id(), start)
                .map_err(|e| e.to_string())?;
        }
    }
    if assignment.count() == 0 {
        return Err(format!(
            "topic {topic} does not exist on {}",
            settings.brokers
        ));
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    eprintln!("following {topic} on {} (Ctrl-C to stop)", settings.brokers);
    let mut stdout = std::io::stdout();
    loop {
        let message = tokio::select! {
            m = consumer.recv() => m.map_err(|e| e.to_string())?,
            _ = kafka::shutdown_signal() => return Ok(()),
        };
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        if let Some(order) = &order {
            let value: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
            // Saga events carry the order in correlationId; parked letters keep the order key.
            let matches = if topic == settings.topic {
                value["correlationId"] == order.as_str()
            } else {
                key.as_deref() == Some(order.as_str())
            };
            if !matches {
                continue;
            }
        }
        // One line per message, as a console consumer prints it.
        let line = payload.replace('\n', " ");
        if writeln!(stdout, "{line}").is_err() {
            return Ok(()); // the reader went away (e.g. `| head`)
        }
    }
}
