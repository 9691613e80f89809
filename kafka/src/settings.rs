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

/// `KAFKA_FETCH_WAIT_MAX_MS` when unset (librdkafka's own default). Apache Kafka answers a
/// fetch as soon as data arrives, so the wait only bounds how often an idle consumer asks
/// again: measured idle broker CPU with the three services 31 % of a core at 10 ms, 16 % at
/// 100 ms, 11 % at 500 ms, saga p50 at 50/s 8–9 ms throughout (README, Performance). tansu
/// 0.6.0 holds every fetch for the whole wait, so there it is added to every hop: use 20.
pub const DEFAULT_FETCH_WAIT_MS: u64 = 500;

/// Kafka's default `retention.ms`: 7 days.
const SEVEN_DAYS_MS: u64 = 7 * 24 * 3600 * 1000;
/// `segment.ms` when unset: one day. Kafka deletes whole segments, so a record stays readable
/// for up to `retention.ms + segment.ms`; Kafka's own default (7 days) would double that.
const ONE_DAY_MS: u64 = 24 * 3600 * 1000;

/// How the saga topic is created when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSettings {
    /// `KAFKA_REPLICATION_FACTOR` (default 1: a single broker). 3 on a three-broker cluster.
    pub replication_factor: i32,
    /// `KAFKA_MIN_INSYNC_REPLICAS` (default 1): replicas that must have a write before it is
    /// acknowledged (the producer uses `acks=all`). 2 with a replication factor of 3, so one
    /// broker may be lost without losing an acknowledged event.
    pub min_insync_replicas: i32,
    /// `KAFKA_RETENTION_MS` (default 7 days): how long the broker keeps events.
    pub retention: Duration,
    /// `KAFKA_SEGMENT_MS` (default 1 day): how often a new segment is rolled.
    pub segment: Duration,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            replication_factor: 1,
            min_insync_replicas: 1,
            retention: Duration::from_millis(SEVEN_DAYS_MS),
            segment: Duration::from_millis(ONE_DAY_MS),
        }
    }
}

impl TopicSettings {
    /// Reads the `KAFKA_*` topic settings.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = TopicSettings::default();
        let ms = |name: &str, default: Duration| -> Result<Duration, ConfigError> {
            Ok(Duration::from_millis(env_or(
                name,
                default.as_millis() as u64,
            )?))
        };
        let t = TopicSettings {
            replication_factor: env_or("KAFKA_REPLICATION_FACTOR", d.replication_factor)?,
            min_insync_replicas: env_or("KAFKA_MIN_INSYNC_REPLICAS", d.min_insync_replicas)?,
            retention: ms("KAFKA_RETENTION_MS", d.retention)?,
            segment: ms("KAFKA_SEGMENT_MS", d.segment)?,
        };
        if t.replication_factor < 1 {
            return Err(invalid(
                "KAFKA_REPLICATION_FACTOR",
                t.replication_factor,
                "must be at least 1",
            ));
        }
        if t.min_insync_replicas < 1 || t.min_insync_replicas > t.replication_factor {
            return Err(invalid(
                "KAFKA_MIN_INSYNC_REPLICAS",
                t.min_insync_replicas,
                "must be from 1 to KAFKA_REPLICATION_FACTOR",
            ));
        }
        Ok(t)
    }

    /// How long a record can still be read after it was written: Kafka deletes a segment only
    /// once its newest record is older than `retention.ms`, and rolls one every `segment.ms`.
    pub fn readable_for(&self) -> Duration {
        self.retention + self.segment
    }

    /// The topic configs given to CreateTopics.
    pub fn configs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("min.insync.replicas", self.min_insync_replicas.to_string()),
            ("retention.ms", self.retention.as_millis().to_string()),
            ("segment.ms", self.segment.as_millis().to_string()),
            ("cleanup.policy", "delete".to_owned()),
        ]
    }
}

fn invalid(name: &str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError {
        name: name.to_owned(),
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

/// The prefix of environment variables passed to every Kafka client as librdkafka properties:
/// `KAFKA_CLIENT_SECURITY_PROTOCOL=SASL_SSL` sets `security.protocol` (lower case, `_` → `.`).
pub const CLIENT_PROPERTY_PREFIX: &str = "KAFKA_CLIENT_";

/// The variable naming a file that holds the broker password (`sasl.password`), so the secret
/// need not sit in the environment.
pub const SASL_PASSWORD_FILE: &str = "KAFKA_SASL_PASSWORD_FILE";

/// `KAFKA_CLIENT_*` properties plus `sasl.password` read from [`SASL_PASSWORD_FILE`], which
/// may not be given together with `KAFKA_CLIENT_SASL_PASSWORD`.
fn client_properties_with_secrets<I>(vars: I) -> Result<Vec<(String, String)>, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let mut properties = client_properties_from(vars.iter().cloned());
    let Some((_, path)) = vars
        .iter()
        .find(|(name, value)| name == SASL_PASSWORD_FILE && !value.trim().is_empty())
    else {
        return Ok(properties);
    };
    if properties.iter().any(|(name, _)| name == "sasl.password") {
        return Err(invalid(
            SASL_PASSWORD_FILE,
            path,
            "KAFKA_CLIENT_SASL_PASSWORD is set too: give the password one way",
        ));
    }
    let password = std::fs::read_to_string(path.trim())
        .map_err(|e| invalid(SASL_PASSWORD_FILE, path, &format!("cannot be read: {e}")))?;
    let password = password.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(invalid(SASL_PASSWORD_FILE, path, "the file is empty"));
    }
    properties.push(("sasl.password".into(), password.to_owned()));
    Ok(properties)
}

/// librdkafka properties from `KAFKA_CLIENT_*` variables, in name order.
pub fn client_properties_from<I>(vars: I) -> Vec<(String, String)>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut properties: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let property = name.strip_prefix(CLIENT_PROPERTY_PREFIX)?;
            (!property.is_empty()).then(|| (property.to_ascii_lowercase().replace('_', "."), value))
        })
        .collect();
    properties.sort();
    properties
}

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
    /// How the topic is created when missing.
    pub topic_config: TopicSettings,
    /// Extra librdkafka properties for every client (`KAFKA_CLIENT_*`): security protocol,
    /// SASL, TLS, to join a managed cluster. Never logged: they may hold secrets.
    pub client_properties: Vec<(String, String)>,
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
            topic_config: TopicSettings::from_env()?,
            client_properties: client_properties_with_secrets(std::env::vars())?,
        })
    }

    /// Settings for a broker at `brokers` and `topic` with every other setting at its
    /// default (tests).
    pub fn new(brokers: &str, topic: &str, group_id: &str) -> Self {
        KafkaSettings {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            partitions: 1,
            group_id: group_id.to_owned(),
            session_timeout: Duration::from_secs(10),
            fetch_wait_max: Duration::from_millis(DEFAULT_FETCH_WAIT_MS),
            instance: group_id.to_owned(),
            topic_config: TopicSettings::default(),
            client_properties: Vec::new(),
        }
    }

    /// A client configuration for these brokers: `bootstrap.servers`, a `client.id` naming
    /// the instance and the client's `role`, then the `KAFKA_CLIENT_*` properties (security
    /// protocol, SASL, TLS).
    pub fn client_config(&self, role: &str) -> rdkafka::ClientConfig {
        self.client_config_with(role, &[])
    }

    /// [`KafkaSettings::client_config`] with the mall's own settings for one kind of client;
    /// the operator's `KAFKA_CLIENT_*` properties still override them.
    pub fn client_config_with(&self, role: &str, ours: &[(&str, &str)]) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // `<instance>/<role>`, e.g. `orders/consumer`: the broker's logs, quotas and
        // `kafka-consumer-groups` tell an instance's clients apart (and so can a test's proxy).
        config.set("client.id", self.client_id(role));
        for (name, value) in ours {
            config.set(*name, *value);
        }
        for (name, value) in &self.client_properties {
            config.set(name, value);
        }
        config
    }

    /// The `client.id` of this instance's client for `role`.
    pub fn client_id(&self, role: &str) -> String {
        format!("{}/{role}", self.instance)
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
    /// The hosts and web origins the service answers for.
    pub access: crate::access::AccessSettings,
    /// `MALL_TOKENS` / `MALL_TOKENS_FILE`: who may do what; none means open, loopback only.
    pub tokens: crate::auth::Tokens,
    /// `HTTP_MAX_CONNECTIONS_PER_ADDRESS` (default 256, at least 1): connections one client
    /// address may hold open at once; more are answered 429 ([`crate::connections`]).
    pub max_connections_per_address: usize,
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
        let retention = RetentionSettings::from_env()?;
        retention.check_covers(&kafka.topic_config)?;
        let tokens = crate::auth::Tokens::from_env()?;
        tokens.check_exposure(&host)?;
        Ok(ServiceSettings {
            access: crate::access::AccessSettings::from_env(&host)?,
            tokens,
            max_connections_per_address: at_least_one(
                crate::connections::SETTING,
                env_or(
                    crate::connections::SETTING,
                    crate::connections::DEFAULT_MAX_PER_ADDRESS,
                )?,
            )?,
            host,
            port,
            database_url: env_or("DATABASE_URL", format!("data/{service}.db"))?,
            kafka,
            retention,
        })
    }
}

/// When an SQLite commit is on disk: `SQLITE_SYNCHRONOUS`, `FULL` (default) or `NORMAL`.
///
/// With `FULL` a commit returns only after its WAL frames are fsynced, so what the API
/// acknowledged and what the relay published survives a power cut. `NORMAL` skips that fsync
/// (a crash of the process still loses nothing; a power cut may lose the last commits while
/// their events are already on the topic): for throwaway runs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSync {
    #[default]
    Full,
    Normal,
}

impl FromStr for SqliteSync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "FULL" => Ok(SqliteSync::Full),
            "NORMAL" => Ok(SqliteSync::Normal),
            _ => Err("must be FULL or NORMAL".into()),
        }
    }
}

impl SqliteSync {
    /// Reads `SQLITE_SYNCHRONOUS`.
    pub fn from_env() -> Result<Self, ConfigError> {
        env_or("SQLITE_SYNCHRONOUS", SqliteSync::Full)
    }

    /// The value of SQLite's `synchronous` pragma.
    pub fn pragma(self) -> &'static str {
        match self {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
        }
    }
}

/// Bounds on every wait of a PostgreSQL connection, so one stalled instance (SIGSTOP, a VM
/// pause, a cut network) cannot make its siblings wait for ever on a lock it holds (an order's, a product's):
/// a wait past a bound fails, and the write is retried (see [`crate::db::DbError::is_transient`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgLimits {
    /// `PG_LOCK_TIMEOUT_MS` (default 5,000): longest wait for a lock (an order's, a product's, a lease's).
    pub lock_timeout: Duration,
    /// `PG_STATEMENT_TIMEOUT_MS` (default 30,000): longest statement, lock waits included.
    pub statement_timeout: Duration,
    /// `PG_IDLE_IN_TRANSACTION_TIMEOUT_MS` (default 3,000): a session idle that long inside a
    /// transaction (its process stopped while holding locks) is ended by the server,
    /// which rolls the transaction back and frees the lock.
    pub idle_in_transaction: Duration,
    /// `PG_KEEPALIVE_S` (default 10): TCP keepalive idle time and probe interval (3 probes), so
    /// a connection to a vanished peer is noticed in about 40 s rather than hours.
    pub keepalive: Duration,
    /// `PG_WRITERS` (default 3): write transactions one instance runs at once, each on a
    /// connection of its own. A write locks only what it decides on, so a write need not wait
    /// for a transaction in flight (a round trip per statement) to commit.
    pub writers: usize,
}

impl Default for PgLimits {
    fn default() -> Self {
        PgLimits {
            lock_timeout: Duration::from_millis(5_000),
            statement_timeout: Duration::from_millis(30_000),
            idle_in_transaction: Duration::from_millis(3_000),
            keepalive: Duration::from_secs(10),
            writers: 3,
        }
    }
}

/// `value` of `name` unless it is 0, which would refuse every connection.
fn at_least_one(name: &str, value: usize) -> Result<usize, ConfigError> {
    match value {
        0 => Err(invalid(name, 0, "must be at least 1")),
        n => Ok(n),
    }
}

/// Reads a positive number of milliseconds (0 would mean "no bound" to PostgreSQL).
fn positive_ms(name: &str, default: Duration) -> Result<Duration, ConfigError> {
    match env_or(name, default.as_millis() as u64)? {
        0 => Err(invalid(
            name,
            0,
            "must be at least 1 ms (0 would mean: wait for ever)",
        )),
        ms => Ok(Duration::from_millis(ms)),
    }
}

impl PgLimits {
    /// Reads `PG_LOCK_TIMEOUT_MS`, `PG_STATEMENT_TIMEOUT_MS`,
    /// `PG_IDLE_IN_TRANSACTION_TIMEOUT_MS`, `PG_KEEPALIVE_S` and `PG_WRITERS`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = PgLimits::default();
        Ok(PgLimits {
            lock_timeout: positive_ms("PG_LOCK_TIMEOUT_MS", d.lock_timeout)?,
            statement_timeout: positive_ms("PG_STATEMENT_TIMEOUT_MS", d.statement_timeout)?,
            idle_in_transaction: positive_ms(
                "PG_IDLE_IN_TRANSACTION_TIMEOUT_MS",
                d.idle_in_transaction,
            )?,
            keepalive: positive_secs("PG_KEEPALIVE_S", d.keepalive)?,
            writers: at_least_one("PG_WRITERS", env_or("PG_WRITERS", d.writers)?)?,
        })
    }

    /// The session settings every connection applies once connected.
    pub fn session_sql(&self) -> String {
        format!(
            "SET lock_timeout = {}; SET statement_timeout = {}; \
             SET idle_in_transaction_session_timeout = {};",
            self.lock_timeout.as_millis(),
            self.statement_timeout.as_millis(),
            self.idle_in_transaction.as_millis()
        )
    }

    /// `url` with libpq's TCP keepalive parameters added, unless the URL sets them itself.
    pub fn with_keepalives(&self, url: &str) -> String {
        let secs = self.keepalive.as_secs().max(1);
        let mut url = url.to_owned();
        for (key, value) in [
            ("keepalives", 1),
            ("keepalives_idle", secs),
            ("keepalives_interval", secs),
            ("keepalives_count", 3),
        ] {
            let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
            if query.split('&').any(|p| p.split('=').next() == Some(key)) {
                continue;
            }
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
        url
    }
}

/// How long dedup state is kept and how often the retention task prunes it
/// (see [`crate::retention`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// `RETENTION_DEDUP_WINDOW_S` (default 8 days: the topic's default `retention.ms` of 7 days
    /// plus its `segment.ms` of 1 day): processed event ids, published outbox rows and settled
    /// saga records older than this are deleted. It must cover the longest redelivery
    /// possible, i.e. as long as the topic can still serve a record.
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

/// The default dedup window: what the default topic settings can still serve.
const EIGHT_DAYS_S: u64 = 8 * 24 * 3600;

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            dedup_window: Duration::from_secs(EIGHT_DAYS_S),
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

    /// Fails, naming `RETENTION_DEDUP_WINDOW_S`, when the dedup window is shorter than the time
    /// the topic can still serve a record (`retention.ms + segment.ms`): an event redelivered
    /// after its id was pruned would be applied twice.
    pub fn check_covers(&self, topic: &TopicSettings) -> Result<(), ConfigError> {
        if self.dedup_window < topic.readable_for() {
            return Err(invalid(
                "RETENTION_DEDUP_WINDOW_S",
                self.dedup_window.as_secs(),
                &format!(
                    "must be at least KAFKA_RETENTION_MS + KAFKA_SEGMENT_MS ({} s): the topic \
                     can serve a record that long, and a redelivered event whose id was pruned \
                     would be applied twice",
                    topic.readable_for().as_secs()
                ),
            ));
        }
        Ok(())
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
    fn postgres_limits_add_keepalives_once_and_keep_the_urls_own() {
        let l = PgLimits::default();
        assert_eq!(
            l.with_keepalives("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db?keepalives=1&keepalives_idle=10&keepalives_interval=10\
             &keepalives_count=3"
        );
        let own = l.with_keepalives("postgres://u@h/db?sslmode=require&keepalives_idle=60");
        assert!(own.contains("keepalives_idle=60") && !own.contains("keepalives_idle=10"));
        assert!(own.contains("sslmode=require&keepalives_idle=60&keepalives=1"));
        assert!(
            l.session_sql()
                .contains("idle_in_transaction_session_timeout = 3000")
        );
    }

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
    fn a_connection_cap_of_zero_is_refused_by_name() {
        let err = at_least_one("HTTP_MAX_CONNECTIONS_PER_ADDRESS", 0).unwrap_err();
        assert!(
            err.to_string()
                .contains("HTTP_MAX_CONNECTIONS_PER_ADDRESS=\"0\""),
            "{err}"
        );
        assert_eq!(
            at_least_one("HTTP_MAX_CONNECTIONS_PER_ADDRESS", 8).unwrap(),
            8
        );
        let err = parse_var::<usize>("HTTP_MAX_CONNECTIONS_PER_ADDRESS", Some("lots".into()), 1)
            .unwrap_err();
        assert!(
            err.to_string().contains("HTTP_MAX_CONNECTIONS_PER_ADDRESS"),
            "{err}"
        );
    }

    #[test]
    fn the_dedup_window_must_cover_what_the_topic_can_still_serve() {
        let topic = TopicSettings::default();
        RetentionSettings::default()
            .check_covers(&topic)
            .expect("the defaults agree");
        let short = RetentionSettings {
            dedup_window: topic.retention, // retention alone is not enough: segments
            ..RetentionSettings::default()
        };
        let err = short.check_covers(&topic).unwrap_err();
        assert_eq!(err.name, "RETENTION_DEDUP_WINDOW_S", "{err}");
    }

    #[test]
    fn client_properties_come_from_prefixed_variables() {
        let vars = [
            ("KAFKA_CLIENT_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_CLIENT_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_CLIENT_", "ignored"),
            ("KAFKA_BROKERS", "not a property"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()));
        assert_eq!(
            client_properties_from(vars),
            vec![
                ("sasl.mechanism".to_owned(), "SCRAM-SHA-512".to_owned()),
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
            ]
        );
    }

    #[test]
    fn the_broker_password_comes_from_its_file_and_only_one_way() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka-password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_string_lossy().into_owned();
        let vars = |more: &[(&str, &str)]| {
            more.iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let got = client_properties_with_secrets(vars(&[
            ("KAFKA_CLIENT_SASL_USERNAME", "orders"),
            (SASL_PASSWORD_FILE, &path),
        ]))
        .unwrap();
        assert!(
            got.contains(&("sasl.password".into(), "s3cret".into())),
            "{got:?}"
        );
        assert!(got.contains(&("sasl.username".into(), "orders".into())));
        let both = client_properties_with_secrets(vars(&[
            ("KAFKA_CLIENT_SASL_PASSWORD", "other"),
            (SASL_PASSWORD_FILE, &path),
        ]))
        .unwrap_err();
        assert_eq!(both.name, SASL_PASSWORD_FILE, "{both}");
        let missing = dir.path().join("none").to_string_lossy().into_owned();
        let err =
            client_properties_with_secrets(vars(&[(SASL_PASSWORD_FILE, &missing)])).unwrap_err();
        assert_eq!(err.name, SASL_PASSWORD_FILE, "{err}");
        std::fs::write(&file, "\n").unwrap();
        assert!(client_properties_with_secrets(vars(&[(SASL_PASSWORD_FILE, &path)])).is_err());
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
