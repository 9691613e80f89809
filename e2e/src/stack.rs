//! The mall as real processes: a fresh tansu broker and the three service binaries on free
//! ports, with their databases, broker storage and logs in one run directory. Used by the
//! real-broker suite (`stack-suite`) and the fault-injection run (`chaos`).
//!
//! Every child is reaped: a process killed here is waited for at once, one that exits by itself
//! is collected by [`Stack::reap_exited`], and whatever still runs is killed and waited for when
//! the [`Stack`] is stopped or dropped (also on a panic). Signals other than SIGKILL are sent
//! with the `kill` command, so no `unsafe` is needed.

use crate::Mall;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The saga topic every run uses.
pub const TOPIC: &str = "eventTopic";
/// The three services, by binary name.
pub const SERVICES: [&str; 3] = ["orders", "products", "delivery"];
/// `KAFKA_SESSION_TIMEOUT_MS` given to every service.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// The `&'static` name of a service, or an error naming the unknown one.
pub fn service_name(service: &str) -> Result<&'static str, String> {
    SERVICES
        .iter()
        .copied()
        .find(|s| *s == service)
        .ok_or_else(|| format!("unknown service {service:?}"))
}

/// One child process, killed and reaped when dropped.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Its name (`tansu` or the service).
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

/// The broker and the three services of one run.
pub struct Stack {
    dir: PathBuf,
    bin_dir: PathBuf,
    tansu: PathBuf,
    broker_port: u16,
    brokers: String,
    ports: HashMap<&'static str, u16>,
    broker: Option<Process>,
    services: HashMap<&'static str, Process>,
    stopped: BTreeSet<&'static str>,
    extra_env: Vec<(&'static str, String, String)>,
    started: Instant,
}

/// A free TCP port on 127.0.0.1 (free now; taken by whoever binds it first).
pub fn free_port() -> std::io::Result<u16> {
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
    /// Starts tansu on a free port (storage `sqlite://tansu.db` in `dir`, which is its working
    /// directory) and the three services, each on its own free port with `<dir>/<svc>.db`.
    /// Does not wait for the services' `/health`.
    pub fn start(dir: &Path, bin_dir: &Path, tansu: &Path) -> Result<Stack, String> {
        Self::start_with(dir, bin_dir, tansu, Vec::new())
    }

    /// [`Stack::start`] with extra environment variables per service: `(service, name, value)`.
    /// Orders always gets `PRODUCTS_URL` and `DELIVERY_URL` of this stack (for its dashboard);
    /// an extra variable of the same name overrides it.
    pub fn start_with(
        dir: &Path,
        bin_dir: &Path,
        tansu: &Path,
        extra_env: Vec<(&'static str, String, String)>,
    ) -> Result<Stack, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let mut stack = Stack {
            dir: dir.to_owned(),
            bin_dir: bin_dir.to_owned(),
            tansu: tansu.to_owned(),
            broker_port: port,
            brokers: format!("127.0.0.1:{port}"),
            ports: HashMap::new(),
            broker: None,
            services: HashMap::new(),
            stopped: BTreeSet::new(),
            extra_env,
            started: Instant::now(),
        };
        stack.spawn_broker()?;
        wait_port(port, Duration::from_secs(30)).map_err(|e| format!("tansu: {e}"))?;
        // Every port first: orders is told where products and delivery answer.
        for service in SERVICES {
            stack
                .ports
                .insert(service, free_port().map_err(|e| e.to_string())?);
        }
        for service in SERVICES {
            stack.start_service(service)?;
        }
        Ok(stack)
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bootstrap servers (`127.0.0.1:<port>`).
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The HTTP port of a service.
    pub fn port(&self, service: &str) -> Option<u16> {
        self.ports.get(service).copied()
    }

    /// `http://127.0.0.1:<port>` of a service.
    pub fn url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.port(service).unwrap_or(0))
    }

    /// True when the service has a live child (possibly SIGSTOPped).
    pub fn is_running(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// True when the broker has a live child.
    pub fn broker_running(&self) -> bool {
        self.broker.is_some()
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

    fn spawn_broker(&mut self) -> Result<(), String> {
        self.mark_log("tansu", "starting");
        let (out, err) = log_file(&self.dir, "tansu").map_err(|e| e.to_string())?;
        let child = Command::new(&self.tansu)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://{}", self.brokers))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", self.brokers))
            .arg("--storage-engine")
            .arg("sqlite://tansu.db") // relative to the run directory
            .current_dir(&self.dir)
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.tansu.display()))?;
        self.broker = Some(Process {
            name: "tansu".into(),
            child,
        });
        Ok(())
    }

    /// Starts a service (again) on its port with its database; the log is appended to.
    pub fn start_service(&mut self, service: &str) -> Result<(), String> {
        let service = service_name(service)?;
        if self.services.contains_key(service) {
            return Err(format!("{service} is already running"));
        }
        self.mark_log(service, "starting");
        let (out, err) = log_file(&self.dir, service).map_err(|e| e.to_string())?;
        let mut command = Command::new(self.bin_dir.join(service));
        command
            .env("PORT", self.ports[service].to_string())
            .env("DATABASE_URL", self.dir.join(format!("{service}.db")))
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
        if service == "orders" {
            // Where orders' dashboard (`/dashboard/config`) sends the page.
            command
                .env("PRODUCTS_URL", self.url("products"))
                .env("DELIVERY_URL", self.url("delivery"));
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
            .map_err(|e| format!("cannot start {service}: {e}"))?;
        self.services.insert(
            service,
            Process {
                name: service.into(),
                child,
            },
        );
        Ok(())
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
        let p = self
            .services
            .remove(service)
            .ok_or(format!("{service} is not running"))?;
        self.stopped.remove(service);
        p.sigkill();
        Ok(())
    }

    /// SIGSTOP a service: it is frozen (no heartbeats, no HTTP answers) until [`Stack::sigcont`].
    pub fn sigstop(&mut self, service: &str) -> Result<(), String> {
        let service = service_name(service)?;
        let p = self
            .services
            .get(service)
            .ok_or(format!("{service} is not running"))?;
        p.signal("STOP")?;
        self.stopped.insert(service);
        Ok(())
    }

    /// SIGCONT a stopped service.
    pub fn sigcont(&mut self, service: &str) -> Result<(), String> {
        let service = service_name(service)?;
        let p = self
            .services
            .get(service)
            .ok_or(format!("{service} is not running"))?;
        p.signal("CONT")?;
        self.stopped.remove(service);
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit by itself; fails if it does not (it is then
    /// killed), or exits with an error. Returns how long it took to stop.
    pub async fn terminate(
        &mut self,
        service: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let mut p = self
            .services
            .remove(service)
            .ok_or(format!("{service} is not running"))?;
        self.stopped.remove(service);
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

    /// `kill -9` the broker and reap it. Its storage stays in the run directory.
    pub fn kill_broker(&mut self) {
        if let Some(p) = self.broker.take() {
            p.sigkill();
        }
    }

    /// Starts the broker again on the same port with the same storage and waits until its port
    /// answers.
    pub async fn restart_broker(&mut self) -> Result<(), String> {
        if self.broker.is_some() {
            return Err("the broker is already running".into());
        }
        self.spawn_broker()?;
        wait_port_async(self.broker_port, Duration::from_secs(30))
            .await
            .map_err(|e| format!("tansu: {e}"))
    }

    /// Reaps every child that exited by itself (a crash): `(name, status)`. Such a service is
    /// no longer running; start it again with [`Stack::restart_service`].
    pub fn reap_exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut exited = Vec::new();
        let names: Vec<&'static str> = self.services.keys().copied().collect();
        for name in names {
            let status = self.services.get_mut(name).and_then(Process::try_exit);
            if let Some(status) = status {
                self.services.remove(name);
                self.stopped.remove(name);
                exited.push((name.to_owned(), status));
            }
        }
        if let Some(status) = self.broker.as_mut().and_then(Process::try_exit) {
            self.broker = None;
            exited.push(("tansu".to_owned(), status));
        }
        exited
    }

    /// The process ids of the running children: the broker as `tansu` first, then the
    /// services in [`SERVICES`] order (a service that is not running is left out).
    pub fn pids(&self) -> Vec<(String, u32)> {
        let broker = self.broker.iter().map(|p| (p.name.clone(), p.pid()));
        let services = SERVICES
            .iter()
            .filter_map(|s| self.services.get(s))
            .map(|p| (p.name.clone(), p.pid()));
        broker.chain(services).collect()
    }

    /// A client for this stack.
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
        self.broker = None;
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
