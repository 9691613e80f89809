//! Configuration from environment variables, with defaults that work on a laptop.
//!
//! Every helper's error names the variable, so a typo in the environment says where it is.

use std::str::FromStr;
use std::time::Duration;

/// A variable is set but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    /// The variable's name.
    pub name: String,
    /// What it was set to.
    pub value: String,
    /// Why that does not parse.
    pub reason: String,
}

/// Reads `name`, or returns `default` when it is unset or empty.
pub fn env_or<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    parse_var(name, std::env::var(name).ok(), default)
}

/// Parses a variable's value; unset or blank means `default`.
fn parse_var<T>(name: &str, value: Option<String>, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match value {
        Some(value) if !value.trim().is_empty() => {
            value.trim().parse().map_err(|e: T::Err| ConfigError {
                name: name.to_owned(),
                value,
                reason: e.to_string(),
            })
        }
        _ => Ok(default),
    }
}

/// Reads a boolean flag: `true/false`, `1/0`, `yes/no`, `on/off`.
pub fn env_flag(name: &str, default: bool) -> Result<bool, ConfigError> {
    let text: String = env_or(name, String::new())?;
    match text.to_ascii_lowercase().as_str() {
        "" => Ok(default),
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError {
            name: name.to_owned(),
            value: text,
            reason: "expected true or false".into(),
        }),
    }
}

/// `KAFKA_FETCH_WAIT_MAX_MS` when unset, chosen from the fetch-wait table in the README: on
/// tansu, 20 ms gives a saga p50 of ~70 ms for ~30% of a core of idle broker CPU (50 ms:
/// ~180 ms for ~14%; 10 ms: ~40 ms for ~48%).
pub const DEFAULT_FETCH_WAIT_MS: u64 = 20;

/// How a service reaches the broker and the saga topic.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `KAFKA_BROKERS`, the bootstrap servers.
    pub brokers: String,
    /// `KAFKA_TOPIC`, the one topic every saga event goes to.
    pub topic: String,
    /// `KAFKA_PARTITIONS`, used when the topic has to be created. One by default: a single
    /// instance reads every partition anyway, and on tansu each partition costs broker CPU on
    /// every fetch (idle broker 14% of a core with one, 31% with three; see the README). Several
    /// instances need at least as many partitions as instances.
    pub partitions: i32,
    /// The consumer group: the service's name, so restarts resume where they stopped.
    pub group_id: String,
    /// `KAFKA_SESSION_TIMEOUT_MS`: how long a silent consumer keeps its partitions.
    pub session_timeout: Duration,
    /// `KAFKA_FETCH_WAIT_MAX_MS`: how long the broker may hold a fetch. Brokers that always
    /// wait this long (tansu) add it to every hop; lower means faster sagas, busier broker.
    pub fetch_wait_max: Duration,
    /// `INSTANCE_ID`: this instance among those of its service sharing one database; it names
    /// the partition and relay leases it holds ([`crate::leases`]). Stable across restarts, so
    /// a restarted instance resumes its own leases at once. Default: `<service>@<machine name>:<port>`.
    pub instance: String,
}

impl KafkaSettings {
    /// Reads the broker settings for the service `group_id`.
    pub fn from_env(group_id: &str) -> Result<Self, ConfigError> {
        Ok(KafkaSettings {
            brokers: env_or("KAFKA_BROKERS", "127.0.0.1:9092".to_string())?,
            topic: env_or("KAFKA_TOPIC", "eventTopic".to_string())?,
            partitions: env_or("KAFKA_PARTITIONS", 1)?,
            group_id: group_id.to_owned(),
            session_timeout: Duration::from_millis(env_or("KAFKA_SESSION_TIMEOUT_MS", 10_000)?),
            fetch_wait_max: Duration::from_millis(env_or(
                "KAFKA_FETCH_WAIT_MAX_MS",
                DEFAULT_FETCH_WAIT_MS,
            )?),
            instance: env_or("INSTANCE_ID", group_id.to_owned())?,
        })
    }

    /// The dead-letter topic where messages that cannot be handled are parked.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.DLT", self.topic)
    }
}

/// What every service reads besides its own options.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// `HOST`, the address to listen on.
    pub host: String,
    /// `PORT`; 0 picks a free port (tests).
    pub port: u16,
    /// `DATABASE_URL`: an SQLite file path (or `sqlite://…`), or a `postgres://…` URL.
    pub database_url: String,
    /// The broker and topic.
    pub kafka: KafkaSettings,
    /// How long settled history is kept.
    pub retention: RetentionSettings,
}

impl ServiceSettings {
    /// Reads the settings of `service` with its default port.
    pub fn from_env(service: events::Service, default_port: u16) -> Result<Self, ConfigError> {
        let host = env_or("HOST", "127.0.0.1".to_string())?;
        let port = env_or("PORT", default_port)?;
        let mut kafka = KafkaSettings::from_env(service.as_str())?;
        // The machine's name, not the listen address: two machines both listening on
        // 127.0.0.1:8081 must not share an id.
        let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| host.clone());
        kafka.instance = env_or("INSTANCE_ID", format!("{service}@{machine}:{port}"))?;
        Ok(ServiceSettings {
            host,
            port,
            database_url: env_or("DATABASE_URL", format!("data/{service}.db"))?,
            kafka,
            retention: RetentionSettings::from_env()?,
        })
    }
}

/// How long dedup state is kept and how often the retention task prunes it
/// (see [`crate::retention`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// `RETENTION_DEDUP_WINDOW_S` (default 7 days, Kafka's default `retention.ms`): processed
    /// event ids, published outbox rows and settled saga records older than this are deleted.
    /// It must cover the longest redelivery possible, i.e. the topic's retention.
    pub dedup_window: Duration,
    /// `RETENTION_INTERVAL_S` (default 60): time between pruning rounds.
    pub interval: Duration,
}

/// Reads a number of seconds, refusing 0 (a zero window would prune dedup state at once).
fn positive_secs(name: &str, default: Duration) -> Result<Duration, ConfigError> {
    match env_or(name, default.as_secs())? {
        0 => Err(ConfigError {
            name: name.to_owned(),
            value: "0".into(),
            reason: "must be at least 1 second".into(),
        }),
        secs => Ok(Duration::from_secs(secs)),
    }
}

/// Kafka's default `retention.ms`: 7 days.
const SEVEN_DAYS_S: u64 = 7 * 24 * 3600;

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            dedup_window: Duration::from_secs(SEVEN_DAYS_S),
            interval: Duration::from_secs(60),
        }
    }
}

impl RetentionSettings {
    /// Reads `RETENTION_DEDUP_WINDOW_S` and `RETENTION_INTERVAL_S`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = RetentionSettings::default();
        Ok(RetentionSettings {
            dedup_window: positive_secs("RETENTION_DEDUP_WINDOW_S", defaults.dedup_window)?,
            interval: positive_secs("RETENTION_INTERVAL_S", defaults.interval)?,
        })
    }

    /// Reads a service's own retention window `name` (seconds, `default_s` when unset), which
    /// must be at least the dedup window: records kept for less could be pruned while an
    /// event about them can still arrive.
    pub fn window_from_env(&self, name: &str, default_s: u64) -> Result<Duration, ConfigError> {
        let window = Duration::from_secs(env_or(name, default_s)?);
        self.check_window(name, window)
    }

    /// `window` (the value of `name`) if it covers the dedup window; otherwise an error
    /// naming `name`.
    pub fn check_window(&self, name: &str, window: Duration) -> Result<Duration, ConfigError> {
        if window < self.dedup_window {
            return Err(ConfigError {
                name: name.to_owned(),
                value: window.as_secs().to_string(),
                reason: format!(
                    "must be at least RETENTION_DEDUP_WINDOW_S ({} s): a record pruned sooner \
                     could be needed by an event that can still arrive",
                    self.dedup_window.as_secs()
                ),
            });
        }
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_variable_and_blank_means_default() {
        let err = parse_var::<u16>("PORT", Some("eighty".into()), 1).unwrap_err();
        assert!(err.to_string().contains("PORT=\"eighty\""), "{err}");
        assert_eq!(
            parse_var::<u16>("PORT", Some(" 8081 ".into()), 1).unwrap(),
            8081
        );
        assert_eq!(parse_var::<u16>("PORT", Some("  ".into()), 7).unwrap(), 7);
        assert_eq!(parse_var::<u16>("PORT", None, 7).unwrap(), 7);
    }

    #[test]
    fn a_window_shorter_than_the_dedup_window_is_refused_by_name() {
        let retention = RetentionSettings::default();
        let short = Duration::from_secs(3600);
        let err = retention
            .check_window("ORDER_HISTORY_RETENTION_S", short)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("ORDER_HISTORY_RETENTION_S=\"3600\""),
            "{err}"
        );
        let long = Duration::from_secs(30 * 24 * 3600);
        assert_eq!(
            retention
                .check_window("ORDER_HISTORY_RETENTION_S", long)
                .unwrap(),
            long
        );
    }
}
