//! The broker of a test run: Apache Kafka (KRaft; one JVM per node, broker and controller in
//! one process; its jars fetched from Maven Central into `.tools/` by `scripts/lib.sh`) or
//! tansu 0.6.0 (`BROKER=tansu`). [`BrokerKind`] says which and how many nodes;
//! [`BrokerNode`] writes a node's configuration, formats its storage on first start and builds
//! the command that runs it. [`crate::stack::Stack`] owns the processes. A single Kafka node
//! also has the client listeners of [`ExtraListeners`]: one behind the test's proxy and one
//! with SASL/SCRAM over TLS.

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Which broker a run starts.
#[derive(Debug, Clone)]
pub enum BrokerKind {
    /// Apache Kafka: the directory of its jars (`.tools/kafka-<version>/libs`) and the number
    /// of nodes (1, or 3 for the failover run: replication factor 3, `min.insync.replicas` 2).
    Kafka {
        /// The jars, put on the class path as `<libs>/*`.
        libs: PathBuf,
        /// Nodes in the cluster.
        nodes: usize,
    },
    /// tansu: its binary.
    Tansu {
        /// `.tools/bin/tansu`.
        bin: PathBuf,
    },
}

impl BrokerKind {
    /// Reads `--kafka LIBS_DIR [--brokers N]` or `--tansu BINARY` from a command line; the path
    /// must exist (it is made absolute: brokers run in the run directory).
    pub fn from_args(args: &[String]) -> Result<BrokerKind, String> {
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
        };
        let absolute = |flag: &str, path: PathBuf| {
            path.canonicalize()
                .map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let nodes = match value("--brokers") {
            None => 1,
            Some(n) => n
                .to_str()
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=5).contains(n))
                .ok_or_else(|| format!("--brokers: a number from 1 to 5, not {}", n.display()))?,
        };
        match (value("--kafka"), value("--tansu")) {
            (Some(libs), None) => Ok(BrokerKind::Kafka {
                libs: absolute("--kafka", libs)?,
                nodes,
            }),
            (None, Some(bin)) if nodes == 1 => Ok(BrokerKind::Tansu {
                bin: absolute("--tansu", bin)?,
            }),
            (None, Some(_)) => Err("--brokers needs --kafka: tansu runs one node".into()),
            _ => Err("give the broker: --kafka <dir of Kafka's jars> or --tansu <binary>".into()),
        }
    }

    /// `kafka` or `tansu`.
    pub fn name(&self) -> &'static str {
        match self {
            BrokerKind::Kafka { .. } => "kafka",
            BrokerKind::Tansu { .. } => "tansu",
        }
    }

    /// Nodes in the cluster.
    pub fn nodes(&self) -> usize {
        match self {
            BrokerKind::Kafka { nodes, .. } => *nodes,
            BrokerKind::Tansu { .. } => 1,
        }
    }

    /// The process name of node `k` (1-based): `kafka` for a single node, `kafka-<k>` in a
    /// cluster.
    pub fn node_name(&self, k: usize) -> String {
        if self.nodes() == 1 {
            self.name().to_owned()
        } else {
            format!("{}-{k}", self.name())
        }
    }
}

/// One node of the run's broker: where it listens and keeps its data.
#[derive(Debug, Clone)]
pub struct BrokerNode {
    /// 1-based; Kafka's `node.id`.
    pub id: usize,
    /// `kafka`, `kafka-2`, `tansu`: its log is `<name>.log` in the run directory.
    pub name: String,
    /// The client listener's port on 127.0.0.1.
    pub port: u16,
    /// The controller listener's port (Kafka only).
    pub controller_port: u16,
    /// More client listeners (a single Kafka node): one behind a proxy, one with SASL.
    pub extra: Option<ExtraListeners>,
}

/// The client listeners a single-node Kafka test broker has besides `PLAINTEXT`.
#[derive(Debug, Clone)]
pub struct ExtraListeners {
    /// `PROXIED` listens here and advertises [`ExtraListeners::proxy_port`], so a client that
    /// bootstraps through the proxy ([`crate::kafka_proxy`]) keeps talking through it.
    pub proxied_port: u16,
    /// Where the proxy listens.
    pub proxy_port: u16,
    /// `SASL`: SASL/SCRAM-SHA-256 over TLS, for the services' credentials.
    pub sasl_port: u16,
    /// SCRAM users and passwords, written into the storage when it is formatted.
    pub scram_users: Vec<(String, String)>,
    /// The `SASL` listener's TLS key and self-signed certificate (PKCS12), made by `keytool`.
    pub keystore: PathBuf,
    /// The keystore's password.
    pub keystore_password: String,
    /// The certificate in PEM, for the clients' `ssl.ca.location`.
    pub ca_pem: PathBuf,
}

impl ExtraListeners {
    /// Free ports for each listener, one SCRAM user per `users` with a new password, and a
    /// TLS key with a certificate for 127.0.0.1 in `<dir>/tls/`.
    pub fn new(users: &[&str], dir: &Path) -> Result<ExtraListeners, String> {
        let port = || crate::stack::free_port().map_err(|e| e.to_string());
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).map_err(|e| format!("{}: {e}", tls.display()))?;
        let (keystore, ca_pem) = (tls.join("broker.p12"), tls.join("ca.pem"));
        let keystore_password = uuid::Uuid::new_v4().simple().to_string();
        let keytool = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("keytool")
                .args(args)
                .args(["-keystore"])
                .arg(&keystore)
                .args(["-storepass", &keystore_password])
                .output()
                .map_err(|e| format!("cannot run keytool (it comes with Java): {e}"))?;
            match out.status.success() {
                true => Ok(()),
                false => Err(format!(
                    "keytool {}: {}{}",
                    args.first().unwrap_or(&""),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )),
            }
        };
        keytool(&[
            "-genkeypair",
            "-alias",
            "broker",
            "-keyalg",
            "RSA",
            "-keysize",
            "2048",
            "-validity",
            "7",
            "-dname",
            "CN=127.0.0.1",
            "-ext",
            "SAN=ip:127.0.0.1,dns:localhost",
            "-storetype",
            "PKCS12",
        ])?;
        let ca = ca_pem.to_string_lossy().into_owned();
        keytool(&["-exportcert", "-rfc", "-alias", "broker", "-file", &ca])?;
        Ok(ExtraListeners {
            proxied_port: port()?,
            proxy_port: port()?,
            sasl_port: port()?,
            scram_users: users
                .iter()
                .map(|u| ((*u).to_owned(), uuid::Uuid::new_v4().simple().to_string()))
                .collect(),
            keystore,
            keystore_password,
            ca_pem,
        })
    }

    /// The SCRAM password of `user`.
    pub fn password(&self, user: &str) -> Option<&str> {
        self.scram_users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.as_str())
    }

    /// The listeners, advertised listeners, protocol map and SASL settings they add.
    fn properties(&self) -> (String, String, String, String) {
        (
            format!(
                ",PROXIED://127.0.0.1:{},SASL://127.0.0.1:{}",
                self.proxied_port, self.sasl_port
            ),
            format!(
                ",PROXIED://127.0.0.1:{},SASL://127.0.0.1:{}",
                self.proxy_port, self.sasl_port
            ),
            ",PROXIED:PLAINTEXT,SASL:SASL_SSL".into(),
            format!(
                "listener.name.sasl.sasl.enabled.mechanisms=SCRAM-SHA-256\n\
                 listener.name.sasl.scram-sha-256.sasl.jaas.config=\
                 org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                 listener.name.sasl.ssl.keystore.type=PKCS12\n\
                 listener.name.sasl.ssl.keystore.location={}\n\
                 listener.name.sasl.ssl.keystore.password={}\n",
                self.keystore.display(),
                self.keystore_password
            ),
        )
    }
}

/// A Kafka cluster id: 16 random bytes in URL-safe base64 without padding, as Kafka's
/// `StorageTool random-uuid` prints them — and, like Kafka's `Uuid.randomUuid`, never one that
/// starts with `-`, which `kafka-storage format -t` would take for an option (seen: one
/// bench start in 64 failed so).
pub fn new_cluster_id() -> String {
    loop {
        let id = encode_cluster_id(*uuid::Uuid::new_v4().as_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// `bytes` in URL-safe base64 without padding.
fn encode_cluster_id(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// The JVM options of a test broker: a heap sized for a 2-core machine and the serial
/// collector (one broker on two cores gains nothing from a concurrent one); `KAFKA_HEAP_OPTS`
/// replaces the heap settings.
fn jvm_options() -> Vec<String> {
    let heap = std::env::var("KAFKA_HEAP_OPTS").unwrap_or_else(|_| "-Xms256m -Xmx768m".into());
    heap.split_whitespace()
        .map(str::to_owned)
        .chain(
            [
                "-XX:+UseSerialGC",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
            ]
            .map(str::to_owned),
        )
        .collect()
}

/// The log4j2 configuration of a node: everything at INFO into `<name>.log` (which also gets
/// its stdout and stderr), the request logger and the state change logger quiet.
fn log_config(log: &Path) -> String {
    format!(
        "status = error\n\
         appender.file.type = File\n\
         appender.file.name = file\n\
         appender.file.fileName = {}\n\
         appender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = INFO\n\
         rootLogger.appenderRef.file.ref = file\n\
         logger.request.name = kafka.request.logger\n\
         logger.request.level = WARN\n\
         logger.state.name = state.change.logger\n\
         logger.state.level = WARN\n",
        log.display()
    )
}

impl BrokerNode {
    /// Writes node `self`'s configuration into `<dir>/<name>/` and, when its storage is not
    /// formatted yet, formats it for `cluster_id`; returns the command that runs it. `voters`
    /// are every node of the cluster.
    pub fn kafka_command(
        &self,
        libs: &Path,
        dir: &Path,
        cluster_id: &str,
        voters: &[BrokerNode],
    ) -> Result<Command, String> {
        let home = dir.join(&self.name);
        let data = home.join("data");
        std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
        let n = voters.len();
        let quorum = voters
            .iter()
            .map(|v| format!("{}@127.0.0.1:{}", v.id, v.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let (listeners, advertised, protocols, sasl) = self
            .extra
            .as_ref()
            .map(ExtraListeners::properties)
            .unwrap_or_default();
        let replicas = n.min(3);
        let min_isr = if replicas >= 3 { 2 } else { 1 };
        let properties = format!(
            "process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={quorum}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}{listeners}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}{advertised}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{protocols}\n\
             {sasl}\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             default.replication.factor={replicas}\n\
             min.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={replicas}\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor={replicas}\n\
             transaction.state.log.min.isr={min_isr}\n\
             share.coordinator.state.topic.replication.factor={replicas}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n\
             unclean.leader.election.enable=false\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             background.threads=2\n\
             log.cleaner.threads=1\n",
            id = self.id,
            port = self.port,
            cport = self.controller_port,
            data = data.display(),
        );
        let config = home.join("server.properties");
        std::fs::write(&config, properties).map_err(|e| format!("{}: {e}", config.display()))?;
        let log4j = home.join("log4j2.properties");
        std::fs::write(&log4j, log_config(&dir.join(format!("{}.log", self.name))))
            .map_err(|e| format!("{}: {e}", log4j.display()))?;
        let java = |main: &str| {
            let mut c = Command::new("java");
            c.args(jvm_options())
                .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
                .arg("-cp")
                .arg(libs.join("*"))
                .arg(main);
            c
        };
        if !data.join("meta.properties").exists() {
            let mut format = java("kafka.tools.StorageTool");
            format
                .args(["format", "--ignore-formatted", "-t", cluster_id, "-c"])
                .arg(&config);
            for (user, password) in self.extra.iter().flat_map(|e| &e.scram_users) {
                format
                    .arg("--add-scram")
                    .arg(format!("SCRAM-SHA-256=[name={user},password={password}]"));
            }
            let out = format
                .output()
                .map_err(|e| format!("cannot run java (Kafka needs Java 17+): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "formatting {}'s storage failed: {}{}",
                    self.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let mut command = java("kafka.Kafka");
        command.arg(&config).current_dir(&home);
        Ok(command)
    }

    /// The data directory of a Kafka node (removed to wipe it).
    pub fn kafka_home(&self, dir: &Path) -> PathBuf {
        dir.join(&self.name)
    }
}

/// Waits (blocking) until a metadata request to `brokers` answers with at least `nodes`
/// registered brokers (a port that accepts connections is not a broker that answers).
pub fn wait_ready(brokers: &str, nodes: usize, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("reconnect.backoff.max.ms", "500")
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    let mut last = String::from("no answer");
    while started.elapsed() < timeout {
        match client.fetch_metadata(None, Duration::from_secs(2)) {
            Ok(m) if m.brokers().len() >= nodes => return Ok(()),
            Ok(m) => last = format!("{} of {nodes} broker(s) registered", m.brokers().len()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "the broker at {brokers} did not answer a metadata request within {timeout:?} ({last})"
    ))
}

/// The node id of the leader of `topic`'s `partition`, from a metadata request.
pub fn leader_of(brokers: &str, topic: &str, partition: i32) -> Result<usize, String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    let m = client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    m.topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
        .and_then(|p| usize::try_from(p.leader()).ok())
        .ok_or_else(|| format!("{topic}[{partition}] has no leader"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_have_kafkas_shape() {
        let id = new_cluster_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id}"
        );
        assert_ne!(id, new_cluster_id());
        // 0xF8 encodes as '-' first: such an id is never handed out.
        assert!(encode_cluster_id([0xF8; 16]).starts_with('-'));
        assert!((0..2000).all(|_| !new_cluster_id().starts_with('-')));
    }
}
