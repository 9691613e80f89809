//! The mall as real processes: a fresh broker (Apache Kafka, one node or a cluster, or tansu;
//! see [`crate::broker`]) and the three service binaries on free ports, with their databases,
//! broker storage and logs in one run directory. Used by the
//! real-broker suite (`stack-suite`) and the fault-injection run (`chaos`).
//!
//! [`StackOptions`] may put the services on PostgreSQL (a fresh database per service per run,
//! given as `DATABASE_URL`), run several instances of each service on that shared database
//! (`INSTANCE_ID=<svc>-<k>`, each on its own port) and set `KAFKA_PARTITIONS`. An instance is
//! named `orders` when there is one per service, `orders-1`, `orders-2`, … otherwise; every
//! method taking a service also takes an instance name, and a bare service name means its
//! instance 1. Its log is `<instance>.log`.
//!
//! Every child is reaped: a process killed here is waited for at once, one that exits by itself
//! is collected by [`Stack::reap_exited`], and whatever still runs is killed and waited for when
//! the [`Stack`] is stopped or dropped (also on a panic). Signals other than SIGKILL are sent
//! with the `kill` command, so no `unsafe` is needed.

use crate::Mall;
use crate::broker::{BrokerKind, BrokerNode, ExtraListeners};
use crate::kafka_proxy::KafkaProxy;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The saga topic every run uses.
pub const TOPIC: &str = "eventTopic";
/// The three services, by binary name.
pub const SERVICES: [&str; 3] = ["orders", "products", "delivery"];
/// How long a broker (a JVM on two busy cores) may take to answer after it was started.
const BROKER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// `KAFKA_SESSION_TIMEOUT_MS` given to every service.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// The name of instance `k` (1-based) of a service when there are `instances` per service:
/// `orders` when there is one, else `orders-<k>`.
pub fn instance_name(service: &str, k: usize, instances: usize) -> String {
    if instances <= 1 {
        service.to_owned()
    } else {
        format!("{service}-{k}")
    }
}

/// The `&'static` name of a service, or an error naming the unknown one.
pub fn service_name(service: &str) -> Result<&'static str, String> {
    SERVICES
        .iter()
        .copied()
        .find(|s| *s == service)
        .ok_or_else(|| format!("unknown service {service:?}"))
}

/// How a [`Stack`] runs its services.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// A PostgreSQL server URL (`postgres://user@host:port/postgres`): each service gets a fresh
    /// database there, shared by its instances. `None`: an SQLite file per service.
    pub postgres: Option<String>,
    /// Instances per service (at least 1; more than 1 needs `postgres`).
    pub instances: usize,
    /// `KAFKA_PARTITIONS` for the services (which create the topic); `None`: their default.
    pub partitions: Option<u32>,
    /// tansu's `--storage-engine`; `None`: `sqlite://tansu.db` in the run directory,
    /// which survives a broker restart (`memory://tansu/` does not: for measuring the
    /// broker's share in a benchmark only). Not used with Apache Kafka.
    pub broker_storage: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            postgres: None,
            instances: 1,
            partitions: None,
            broker_storage: None,
        }
    }
}

impl StackOptions {
    /// Reads `--postgres URL`, `--instances N`, `--partitions P` and `--broker-storage URL`
    /// from a command line.
    pub fn from_args(args: &[String]) -> Result<StackOptions, String> {
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .map(|i| args.get(i + 1).ok_or(format!("{name} needs a value")))
                .transpose()
        };
        let mut o = StackOptions {
            postgres: value("--postgres")?.cloned(),
            broker_storage: value("--broker-storage")?.cloned(),
            ..StackOptions::default()
        };
        if let Some(n) = value("--instances")? {
            o.instances = n
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or(format!("--instances: not a positive number: {n}"))?;
        }
        if let Some(p) = value("--partitions")? {
            o.partitions = Some(
                p.parse()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or(format!("--partitions: not a positive number: {p}"))?,
            );
        }
        o.validate()?;
        Ok(o)
    }

    /// Fails on `instances > 1` without `postgres`.
    pub fn validate(&self) -> Result<(), String> {
        if self.instances == 0 {
            return Err("--instances must be at least 1".into());
        }
        if self.instances > 1 && self.postgres.is_none() {
            return Err(format!(
                "--instances {} needs --postgres: instances share their service's database, \
                 and an SQLite file cannot be shared between processes",
                self.instances
            ));
        }
        Ok(())
    }
}

/// The live (running and not stopped) instances of a [`Stack`], shared with clients so they
/// can spread requests over them ([`Pool`]).
pub type Live = Arc<Mutex<BTreeSet<String>>>;

/// The instances of one service, for spreading requests round-robin over the live ones.
#[derive(Debug, Clone)]
pub struct Pool {
    /// `(instance, base URL)`, instance 1 first.
    instances: Vec<(String, String)>,
    live: Live,
    next: Arc<AtomicUsize>,
}

impl Pool {
    /// The base URL of the next live instance, round-robin; when none is live, the next one
    /// anyway (the request then fails as it would have).
    pub fn pick(&self) -> String {
        self.pick_instance().1
    }

    /// [`Pool::pick`] with the instance's name: `(instance, base URL)`.
    pub fn pick_instance(&self) -> (String, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let len = self.instances.len();
        (0..len)
            .map(|i| &self.instances[(n + i) % len])
            .find(|(name, _)| live.contains(name))
            .unwrap_or(&self.instances[n % len])
            .clone()
    }

    /// Every instance's base URL.
    pub fn all(&self) -> impl Iterator<Item = (&str, &str)> {
        self.instances.iter().map(|(n, u)| (n.as_str(), u.as_str()))
    }
}

/// One child process, killed and reaped when dropped.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Its name (the broker node's or the service instance's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, …) with the `kill` command.
    pub fn signal(&self, signal: &str) -> Result<(), String> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .map_err(|e| format!("kill -{signal} {}: {e}", self.name))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "kill -{signal} {} ({}) failed",
                self.name,
                self.pid()
            ))
        }
    }

    /// SIGKILL and reap: no shutdown path runs. Works on a stopped process too.
    pub fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Drop kills again, harmlessly: the child is reaped.
    }

    /// The exit status if it has exited (and reaps it), else `None`.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker and the three services (one or more instances each) of one run.
pub struct Stack {
    dir: PathBuf,
    bin_dir: PathBuf,
    broker_kind: BrokerKind,
    /// The broker's nodes (one but for a Kafka cluster).
    nodes: Vec<BrokerNode>,
    /// The Kafka cluster id its storage is formatted with; a new one when wiped.
    cluster_id: String,
    brokers: String,
    options: StackOptions,
    /// `DATABASE_URL` per service.
    databases: HashMap<&'static str, String>,
    /// HTTP port per instance.
    ports: HashMap<String, u16>,
    /// Running broker nodes, by node index (0-based).
    broker: Vec<Option<Process>>,
    /// Running children per instance.
    services: HashMap<String, Process>,
    stopped: BTreeSet<String>,
    live: Live,
    extra_env: Vec<(&'static str, String, String)>,
    /// In front of the single Kafka node's `PROXIED` listener; dropped with the stack.
    proxy: Option<KafkaProxy>,
    started: Instant,
}

/// A free TCP port on 127.0.0.1 for a process started later: free now, below the kernel's
/// ephemeral range and never handed out twice by this process.
///
/// Why not port 0's pick: that comes from the ephemeral range, which outgoing connections
/// (the services' own broker connections, say) draw from too; between the pick and the
/// service's bind one of them can take it (seen: "Address already in use" for delivery in a
/// bench). Below the range only an explicit bind takes a port.
pub fn free_port() -> std::io::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let from = ephemeral_from.saturating_sub(12_000).max(1024);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let random = std::collections::hash_map::RandomState::new();
    let span = u64::from(ephemeral_from - from);
    for attempt in 0..500u32 {
        let port = from + (std::hash::BuildHasher::hash_one(&random, attempt) % span) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_file(dir: &Path, name: &str) -> std::io::Result<(File, File)> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    Ok((file.try_clone()?, file))
}

/// Waits (blocking) until something accepts connections on `port`.
pub fn wait_port(port: u16, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > timeout {
            return Err(format!("port {port} did not open within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits (async) until something accepts connections on `port`.
pub async fn wait_port_async(port: u16, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        if matches!(attempt, Ok(Ok(_))) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!("port {port} did not open within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Stack {
    /// Starts the broker on free ports (its storage in `dir`) and waits until it answers a
    /// metadata request, then the three services, each on its own free port with
    /// `<dir>/<svc>.db`. Does not wait for the services' `/health`.
    pub fn start(dir: &Path, bin_dir: &Path, broker: &BrokerKind) -> Result<Stack, String> {
        Self::start_with(dir, bin_dir, broker, Vec::new())
    }

    /// [`Stack::start`] with extra environment variables per service: `(service, name, value)`.
    /// Orders always gets `PRODUCTS_URL` and `DELIVERY_URL` of this stack (for its dashboard);
    /// an extra variable of the same name overrides it.
    pub fn start_with(
        dir: &Path,
        bin_dir: &Path,
        broker: &BrokerKind,
        extra_env: Vec<(&'static str, String, String)>,
    ) -> Result<Stack, String> {
        Self::start_with_options(dir, bin_dir, broker, extra_env, StackOptions::default())
    }

    /// [`Stack::start_with`] with [`StackOptions`]: PostgreSQL databases (created here, fresh),
    /// several instances per service, the number of partitions.
    pub fn start_with_options(
        dir: &Path,
        bin_dir: &Path,
        broker: &BrokerKind,
        extra_env: Vec<(&'static str, String, String)>,
        options: StackOptions,
    ) -> Result<Stack, String> {
        options.validate()?;
        let mut databases = HashMap::new();
        for service in SERVICES {
            let url = match &options.postgres {
                Some(server) => crate::pg::fresh_database(
                    server,
                    &crate::pg::unique_name(&format!("mall_{service}")),
                )?,
                None => dir
                    .join(format!("{service}.db"))
                    .to_string_lossy()
                    .into_owned(),
            };
            databases.insert(service, url);
        }
        // A single Kafka node also listens behind a proxy and with SASL/SCRAM.
        let extra = match broker {
            BrokerKind::Kafka { nodes: 1, .. } => Some(ExtraListeners::new(&SERVICES, dir)?),
            _ => None,
        };
        let proxy = match &extra {
            Some(e) => Some(
                KafkaProxy::start(e.proxy_port, ([127, 0, 0, 1], e.proxied_port).into())
                    .map_err(|err| format!("cannot start the broker's proxy: {err}"))?,
            ),
            None => None,
        };
        let mut nodes = Vec::new();
        for k in 1..=broker.nodes() {
            nodes.push(BrokerNode {
                id: k,
                name: broker.node_name(k),
                port: free_port().map_err(|e| e.to_string())?,
                controller_port: free_port().map_err(|e| e.to_string())?,
                extra: extra.clone(),
            });
        }
        let brokers = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let mut stack = Stack {
            dir: dir.to_owned(),
            bin_dir: bin_dir.to_owned(),
            broker_kind: broker.clone(),
            broker: nodes.iter().map(|_| None).collect(),
            nodes,
            cluster_id: crate::broker::new_cluster_id(),
            brokers,
            options,
            databases,
            ports: HashMap::new(),
            services: HashMap::new(),
            stopped: BTreeSet::new(),
            live: Live::default(),
            extra_env,
            proxy,
            started: Instant::now(),
        };
        stack.spawn_broker()?;
        crate::broker::wait_ready(&stack.brokers, stack.nodes.len(), BROKER_READY_TIMEOUT)?;
        // Every port first: orders is told where products and delivery answer.
        let all = stack.all_instances();
        for instance in &all {
            stack
                .ports
                .insert(instance.clone(), free_port().map_err(|e| e.to_string())?);
        }
        for instance in &all {
            stack.start_service(instance)?;
        }
        Ok(stack)
    }

    /// The options it was started with.
    pub fn options(&self) -> &StackOptions {
        &self.options
    }

    /// Instances per service.
    pub fn instance_count(&self) -> usize {
        self.options.instances
    }

    /// The name of instance `k` (1-based) of a service: `orders` when there is one instance per
    /// service, else `orders-<k>`.
    pub fn instance_name(&self, service: &str, k: usize) -> String {
        instance_name(service, k, self.options.instances)
    }

    /// The instances of a service, instance 1 first.
    pub fn instances(&self, service: &str) -> Vec<String> {
        (1..=self.options.instances)
            .map(|k| self.instance_name(service, k))
            .collect()
    }

    /// Every instance of every service, in [`SERVICES`] order.
    pub fn all_instances(&self) -> Vec<String> {
        SERVICES.iter().flat_map(|s| self.instances(s)).collect()
    }

    /// `(service, instance name)` of a service name (its instance 1) or an instance name.
    pub fn resolve(&self, name: &str) -> Result<(&'static str, String), String> {
        if let Ok(service) = service_name(name) {
            return Ok((service, self.instance_name(service, 1)));
        }
        if let Some((service, k)) = name.rsplit_once('-')
            && let (Ok(service), Ok(k)) = (service_name(service), k.parse::<usize>())
            && (1..=self.options.instances).contains(&k)
            && self.options.instances > 1
        {
            return Ok((service, name.to_owned()));
        }
        Err(format!("unknown service or instance {name:?}"))
    }

    /// The shared set of live instances (running, not stopped).
    pub fn live(&self) -> Live {
        self.live.clone()
    }

    /// The instances of a service as a [`Pool`] over this stack's live set.
    pub fn pool(&self, service: &str) -> Pool {
        Pool {
            instances: self
                .instances(service)
                .into_iter()
                .map(|i| {
                    let url = self.url(&i);
                    (i, url)
                })
                .collect(),
            live: self.live.clone(),
            next: Arc::default(),
        }
    }

    /// True when an instance answers requests as far as the stack knows (running, not stopped).
    pub fn is_live(&self, name: &str) -> bool {
        self.resolve(name)
            .is_ok_and(|(_, i)| self.services.contains_key(&i) && !self.stopped.contains(&i))
    }

    fn sync_live(&self) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.clear();
        live.extend(
            self.services
                .keys()
                .filter(|i| !self.stopped.contains(*i))
                .cloned(),
        );
    }

    /// The `DATABASE_URL` of a service (an SQLite path or a PostgreSQL URL).
    pub fn database_url(&self, service: &str) -> Option<&str> {
        self.databases.get(service).map(String::as_str)
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bootstrap servers (`127.0.0.1:<port>`).
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The HTTP port of a service (its instance 1) or an instance.
    pub fn port(&self, service: &str) -> Option<u16> {
        let (_, instance) = self.resolve(service).ok()?;
        self.ports.get(&instance).copied()
    }

    /// `http://127.0.0.1:<port>` of a service.
    pub fn url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.port(service).unwrap_or(0))
    }

    /// True when the service (instance) has a live child (possibly SIGSTOPped).
    pub fn is_running(&self, service: &str) -> bool {
        self.resolve(service)
            .is_ok_and(|(_, i)| self.services.contains_key(&i))
    }

    /// True when every broker node has a live child.
    pub fn broker_running(&self) -> bool {
        self.broker.iter().all(Option::is_some)
    }

    /// The broker this stack runs.
    pub fn broker_kind(&self) -> &BrokerKind {
        &self.broker_kind
    }

    /// True when `name` is one of the broker's nodes (as [`Stack::reap_exited`] and
    /// [`Stack::pids`] name them).
    pub fn is_broker(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.name == name)
    }

    /// The broker's nodes.
    pub fn broker_nodes(&self) -> &[BrokerNode] {
        &self.nodes
    }

    /// The proxy in front of the broker (a single Kafka node), with its bootstrap address.
    pub fn proxy(&self) -> Option<(&KafkaProxy, String)> {
        self.proxy
            .as_ref()
            .map(|p| (p, format!("127.0.0.1:{}", p.port())))
    }

    /// The SASL/SCRAM listener of a single Kafka node and its users' passwords.
    pub fn sasl_listener(&self) -> Option<&ExtraListeners> {
        self.nodes.first().and_then(|n| n.extra.as_ref())
    }

    /// Appends a marker line to a process's log, so restarts are easy to find.
    fn mark_log(&self, name: &str, what: &str) {
        if let Ok((mut file, _)) = log_file(&self.dir, name) {
            let _ = writeln!(
                file,
                "----- {what} {name} at +{:.1} s -----",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// Starts every broker node that is not running.
    fn spawn_broker(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            if self.broker[i].is_none() {
                self.spawn_broker_node(i)?;
            }
        }
        Ok(())
    }

    /// Starts broker node `i` (0-based) on its ports with its storage.
    fn spawn_broker_node(&mut self, i: usize) -> Result<(), String> {
        let node = self.nodes[i].clone();
        self.mark_log(&node.name, "starting");
        let (out, err) = log_file(&self.dir, &node.name).map_err(|e| e.to_string())?;
        let mut command = match &self.broker_kind {
            BrokerKind::Kafka { libs, .. } => {
                node.kafka_command(libs, &self.dir, &self.cluster_id, &self.nodes)?
            }
            BrokerKind::Tansu { bin } => {
                let mut c = Command::new(bin);
                c.arg("broker")
                    .arg("--listener-url")
                    .arg(format!("tcp://{}", self.brokers))
                    .arg("--advertised-listener-url")
                    .arg(format!("tcp://{}", self.brokers))
                    .arg("--storage-engine")
                    .arg(
                        self.options
                            .broker_storage
                            .as_deref()
                            .unwrap_or("sqlite://tansu.db"), // relative to the run directory
                    )
                    .current_dir(&self.dir);
                c
            }
        };
        let child = command
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", node.name))?;
        self.broker[i] = Some(Process {
            name: node.name,
            child,
        });
        Ok(())
    }

    /// Starts a service instance (again) on its port with its database; the log is appended to.
    pub fn start_service(&mut self, service: &str) -> Result<(), String> {
        let (service, instance) = self.resolve(service)?;
        if self.services.contains_key(&instance) {
            return Err(format!("{instance} is already running"));
        }
        self.mark_log(&instance, "starting");
        let (out, err) = log_file(&self.dir, &instance).map_err(|e| e.to_string())?;
        let mut command = Command::new(self.bin_dir.join(service));
        command
            .env("PORT", self.ports[&instance].to_string())
            .env("DATABASE_URL", &self.databases[service])
            .env("KAFKA_BROKERS", &self.brokers)
            .env("KAFKA_TOPIC", TOPIC)
            .env(
                "KAFKA_SESSION_TIMEOUT_MS",
                SESSION_TIMEOUT.as_millis().to_string(),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        if self.options.instances > 1 {
            command.env("INSTANCE_ID", &instance);
        }
        if let Some(p) = self.options.partitions {
            command.env("KAFKA_PARTITIONS", p.to_string());
        }
        if self.nodes.len() >= 3 {
            // Acknowledged events survive the loss of any one broker.
            command
                .env("KAFKA_REPLICATION_FACTOR", "3")
                .env("KAFKA_MIN_INSYNC_REPLICAS", "2");
        }
        if service == "orders" {
            // Where orders' dashboard (`/dashboard/config`) sends the page.
            command
                .env("PRODUCTS_URL", self.url("products"))
                .env("DELIVERY_URL", self.url("delivery"));
        } else {
            // The dashboard, served by each orders instance, calls products and delivery.
            let dashboards = self
                .instances("orders")
                .iter()
                .map(|orders| self.url(orders))
                .collect::<Vec<_>>();
            command.env("CORS_ORIGINS", dashboards.join(","));
        }
        for (target, name, value) in &self.extra_env {
            if *target == service {
                command.env(name, value);
            }
        }
        let child = command
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {instance}: {e}"))?;
        self.services.insert(
            instance.clone(),
            Process {
                name: instance,
                child,
            },
        );
        self.sync_live();
        Ok(())
    }

    /// Sets an environment variable of `service`'s instances from their next start on,
    /// replacing an extra variable of the same name.
    pub fn set_env(&mut self, service: &'static str, name: &str, value: &str) {
        self.unset_env(service, name);
        self.extra_env
            .push((service, name.to_owned(), value.to_owned()));
    }

    /// Removes an extra environment variable of `service`'s instances from their next start on.
    pub fn unset_env(&mut self, service: &'static str, name: &str) {
        self.extra_env
            .retain(|(target, n, _)| !(*target == service && n == name));
    }

    /// Starts a service that is not running (after a kill, a SIGTERM or a crash).
    pub fn restart_service(&mut self, service: &str) -> Result<(), String> {
        self.start_service(service)
    }

    /// `kill -9` a service and reap it; prints `killed <svc> (SIGKILL)` as the suite always did.
    pub fn kill(&mut self, service: &str) {
        if self.sigkill(service).is_ok() {
            println!("    killed {service} (SIGKILL)");
        }
    }

    /// `kill -9` a service and reap it: no shutdown path runs. Fails if it is not running.
    pub fn sigkill(&mut self, service: &str) -> Result<(), String> {
        let (_, instance) = self.resolve(service)?;
        let p = self
            .services
            .remove(&instance)
            .ok_or(format!("{instance} is not running"))?;
        self.stopped.remove(&instance);
        self.sync_live();
        p.sigkill();
        Ok(())
    }

    /// SIGSTOP a service: it is frozen (no heartbeats, no HTTP answers) until [`Stack::sigcont`].
    pub fn sigstop(&mut self, service: &str) -> Result<(), String> {
        let (_, instance) = self.resolve(service)?;
        let p = self
            .services
            .get(&instance)
            .ok_or(format!("{instance} is not running"))?;
        p.signal("STOP")?;
        self.stopped.insert(instance);
        self.sync_live();
        Ok(())
    }

    /// SIGCONT a stopped service.
    pub fn sigcont(&mut self, service: &str) -> Result<(), String> {
        let (_, instance) = self.resolve(service)?;
        let p = self
            .services
            .get(&instance)
            .ok_or(format!("{instance} is not running"))?;
        p.signal("CONT")?;
        self.stopped.remove(&instance);
        self.sync_live();
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit by itself; fails if it does not (it is then
    /// killed), or exits with an error. Returns how long it took to stop.
    pub async fn terminate(
        &mut self,
        service: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let (_, service) = self.resolve(service)?;
        let mut p = self
            .services
            .remove(&service)
            .ok_or(format!("{service} is not running"))?;
        self.stopped.remove(&service);
        self.sync_live();
        let started = Instant::now();
        p.signal("TERM")?;
        while started.elapsed() < timeout {
            match p.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(started.elapsed()),
                Ok(Some(status)) => {
                    return Err(format!("{service} exited with {status} on SIGTERM"));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e.to_string()),
            }
        }
        p.sigkill();
        Err(format!(
            "{service} did not stop within {timeout:?} of SIGTERM (killed)"
        ))
    }

    /// The same as [`Stack::terminate`]: a graceful stop, waited for.
    pub async fn sigterm_and_wait(
        &mut self,
        service: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        self.terminate(service, timeout).await
    }

    /// `kill -9` every broker node and reap it. Its storage stays in the run directory.
    pub fn kill_broker(&mut self) {
        for node in &mut self.broker {
            if let Some(p) = node.take() {
                p.sigkill();
            }
        }
    }

    /// `kill -9` broker node `id` (1-based, Kafka's node id) and reap it.
    pub fn kill_broker_node(&mut self, id: usize) -> Result<(), String> {
        let p = self
            .broker
            .get_mut(id.wrapping_sub(1))
            .and_then(Option::take)
            .ok_or(format!("broker node {id} is not running"))?;
        p.sigkill();
        Ok(())
    }

    /// Starts every broker node that is not running again, on the same ports with the same
    /// storage, and waits until the broker answers a metadata request with all its nodes.
    pub async fn restart_broker(&mut self) -> Result<(), String> {
        if self.broker_running() {
            return Err("the broker is already running".into());
        }
        self.spawn_broker()?;
        self.wait_broker_ready().await
    }

    /// Waits (off the runtime's threads) until a metadata request names every node.
    async fn wait_broker_ready(&self) -> Result<(), String> {
        let (brokers, nodes) = (self.brokers.clone(), self.nodes.len());
        tokio::task::spawn_blocking(move || {
            crate::broker::wait_ready(&brokers, nodes, BROKER_READY_TIMEOUT)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", self.broker_kind.name()))
    }

    /// Waits until `instance` exits by itself (a refused start, say) and returns its status.
    pub async fn wait_exited(
        &mut self,
        instance: &str,
        timeout: Duration,
    ) -> Result<ExitStatus, String> {
        let started = Instant::now();
        loop {
            if let Some((_, status)) = self
                .reap_exited()
                .into_iter()
                .find(|(name, _)| name == instance)
            {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                return Err(format!("{instance} still runs after {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last line of `instance`'s log that contains `text`.
    pub fn log_line(&self, instance: &str, text: &str) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.join(format!("{instance}.log"))).ok()?;
        log.lines()
            .rev()
            .find(|l| l.contains(text))
            .map(|l| l.trim().to_owned())
    }

    /// Starts broker node `id` (1-based) again and waits until all nodes answer.
    pub async fn restart_broker_node(&mut self, id: usize) -> Result<(), String> {
        let i = id.wrapping_sub(1);
        match self.broker.get(i) {
            None => return Err(format!("no broker node {id}")),
            Some(Some(_)) => return Err(format!("broker node {id} is already running")),
            Some(None) => {}
        }
        self.spawn_broker_node(i)?;
        self.wait_broker_ready().await
    }

    /// Stops the broker, deletes its storage and starts a new one (a new Kafka cluster id) on
    /// the same ports: what a user gets by wiping the broker's data but not the databases.
    pub async fn wipe_broker(&mut self) -> Result<(), String> {
        self.kill_broker();
        for node in &self.nodes {
            let home = node.kafka_home(&self.dir);
            if home.exists() {
                std::fs::remove_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
            }
        }
        let tansu_db = self.dir.join("tansu.db");
        if tansu_db.exists() {
            std::fs::remove_file(&tansu_db).map_err(|e| e.to_string())?;
        }
        self.cluster_id = crate::broker::new_cluster_id();
        self.restart_broker().await
    }

    /// Reaps every child that exited by itself (a crash): `(name, status)`. Such a service is
    /// no longer running; start it again with [`Stack::restart_service`].
    pub fn reap_exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut exited = Vec::new();
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let status = self.services.get_mut(&name).and_then(Process::try_exit);
            if let Some(status) = status {
                self.services.remove(&name);
                self.stopped.remove(&name);
                exited.push((name, status));
            }
        }
        self.sync_live();
        for node in &mut self.broker {
            if let Some(status) = node.as_mut().and_then(Process::try_exit) {
                let name = node.take().map(|p| p.name.clone()).unwrap_or_default();
                exited.push((name, status));
            }
        }
        exited
    }

    /// The process ids of the running children: the broker's nodes first, then the
    /// instances in [`SERVICES`] order (one that is not running is left out).
    pub fn pids(&self) -> Vec<(String, u32)> {
        let broker = self
            .broker
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.pid()));
        let services = self
            .all_instances()
            .into_iter()
            .filter_map(|i| self.services.get(&i))
            .map(|p| (p.name.clone(), p.pid()))
            .collect::<Vec<_>>();
        broker.chain(services).collect()
    }

    /// A client for instance `k` (1-based) of each service.
    pub fn mall_of(&self, k: usize) -> Mall {
        let url = |s: &str| self.url(&self.instance_name(s, k));
        Mall::new(
            url("orders"),
            url("products"),
            url("delivery"),
            self.brokers.clone(),
            TOPIC.into(),
        )
    }

    /// A client for this stack (instance 1 of each service).
    pub fn mall(&self) -> Mall {
        Mall::new(
            self.url("orders"),
            self.url("products"),
            self.url("delivery"),
            self.brokers.clone(),
            TOPIC.into(),
        )
    }

    /// Kills and reaps everything (a stopped process too).
    pub fn stop(&mut self) {
        self.services.clear();
        self.stopped.clear();
        self.sync_live();
        for node in &mut self.broker {
            *node = None;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value after `name` on a command line (`--bin-dir target/debug`), as a path.
pub fn argument(args: &[String], name: &str) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}
