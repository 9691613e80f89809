//! The real-broker end-to-end suite (`scripts/test.sh` runs it): a fresh tansu broker and fresh
//! databases on free ports, the three service binaries as separate processes, and the saga
//! scenarios over HTTP — including 100 concurrent orders and a `kill -9` of products while
//! orders are in flight. Every process it starts is stopped when it ends, even on failure.
//! Prints one line per scenario and a closing `N passed, N failed`.
//!
//! Usage: `stack-suite --bin-dir target/debug --tansu .tools/bin/tansu`

use e2e::{Check, Mall, eventually, read_topic, scenarios};
use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

const TOPIC: &str = "eventTopic";
const SERVICES: [&str; 3] = ["orders", "products", "delivery"];

/// One child process, killed when dropped.
struct Process {
    name: String,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker and the three services of one run.
struct Stack {
    dir: PathBuf,
    bin_dir: PathBuf,
    brokers: String,
    ports: HashMap<&'static str, u16>,
    broker: Option<Process>,
    services: HashMap<&'static str, Process>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_file(dir: &Path, name: &str) -> std::io::Result<(File, File)> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    Ok((file.try_clone()?, file))
}

impl Stack {
    fn start(dir: &Path, bin_dir: &Path, tansu: &Path) -> Result<Stack, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let brokers = format!("127.0.0.1:{port}");
        let (out, err) = log_file(dir, "tansu").map_err(|e| e.to_string())?;
        let child = Command::new(tansu)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://{brokers}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{brokers}"))
            .arg("--storage-engine")
            .arg("sqlite://tansu.db") // relative to the run directory
            .current_dir(dir)
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", tansu.display()))?;
        let mut stack = Stack {
            dir: dir.to_owned(),
            bin_dir: bin_dir.to_owned(),
            brokers,
            ports: HashMap::new(),
            broker: Some(Process {
                name: "tansu".into(),
                child,
            }),
            services: HashMap::new(),
        };
        wait_port(port, Duration::from_secs(30)).map_err(|e| format!("tansu: {e}"))?;
        for service in SERVICES {
            stack
                .ports
                .insert(service, free_port().map_err(|e| e.to_string())?);
            stack.start_service(service)?;
        }
        Ok(stack)
    }

    fn start_service(&mut self, service: &'static str) -> Result<(), String> {
        let (out, err) = log_file(&self.dir, service).map_err(|e| e.to_string())?;
        let child = Command::new(self.bin_dir.join(service))
            .env("PORT", self.ports[service].to_string())
            .env("DATABASE_URL", self.dir.join(format!("{service}.db")))
            .env("KAFKA_BROKERS", &self.brokers)
            .env("KAFKA_TOPIC", TOPIC)
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
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

    /// `kill -9`: no shutdown path runs.
    fn kill(&mut self, service: &str) {
        if let Some(mut p) = self.services.remove(service) {
            let _ = p.child.kill();
            let _ = p.child.wait();
            println!("    killed {} (SIGKILL)", p.name);
        }
    }

    /// SIGTERM, then waits for the process to exit by itself; fails if it does not, or exits
    /// with an error.
    fn terminate(&mut self, service: &str, timeout: Duration) -> Result<Duration, String> {
        let mut p = self
            .services
            .remove(service)
            .ok_or(format!("{service} is not running"))?;
        let started = Instant::now();
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(p.child.id().to_string())
            .status()
            .map_err(|e| format!("kill -TERM {service}: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -TERM {service} failed"));
        }
        while started.elapsed() < timeout {
            match p.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(started.elapsed()),
                Ok(Some(status)) => {
                    return Err(format!("{service} exited with {status} on SIGTERM"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!(
            "{service} did not stop within {timeout:?} of SIGTERM"
        ))
    }

    fn mall(&self) -> Mall {
        let url = |s: &str| format!("http://127.0.0.1:{}", self.ports[s]);
        Mall::new(
            url("orders"),
            url("products"),
            url("delivery"),
            self.brokers.clone(),
            TOPIC.into(),
        )
    }

    fn stop(&mut self) {
        self.services.clear();
        self.broker = None;
    }
}

fn wait_port(port: u16, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > timeout {
            return Err(format!("port {port} did not open within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `kill -9` products while orders are being placed, restart it: every saga still ends, every
/// order reserves its stock exactly once.
async fn products_killed_mid_flight(stack: &mut Stack) -> Check {
    let m = stack.mall();
    let product = m.create_product("crash", 50).await?;
    let placing = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..40 {
                ids.push(m.place_order(product, 1).await?);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, String>(ids)
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    stack.kill("products");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.start_service("products")?;
    println!("    restarted products");
    let ids = placing.await.map_err(|e| e.to_string())??;
    m.wait_healthy().await?;
    for id in &ids {
        eventually(
            &format!("order {id} completes"),
            Duration::from_secs(90),
            || m.wait_order_state(*id, "OrderCompleted"),
        )
        .await?;
    }
    m.wait_stock(product, (10, 40)).await?;
    let mut decreased: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for message in read_topic(&m.brokers, &m.topic).await? {
        if message.value["eventType"] == "StockDecreased" && message.value["productId"] == product {
            decreased
                .entry(message.value["orderId"].to_string())
                .or_default()
                .insert(message.value["eventId"].to_string());
        }
    }
    if decreased.len() != ids.len() || decreased.values().any(|ids| ids.len() != 1) {
        return Err(format!(
            "expected one StockDecreased per order for {} orders, got {decreased:?}",
            ids.len()
        ));
    }
    Ok(())
}

/// SIGTERM orders right after a burst of orders: it stops by itself, cleanly, and after a
/// restart every saga of the burst completes.
async fn graceful_stop(stack: &mut Stack) -> Check {
    let m = stack.mall();
    let product = m.create_product("graceful", 20).await?;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(m.place_order(product, 1).await?);
    }
    let took = stack.terminate("orders", Duration::from_secs(20))?;
    println!(
        "    orders stopped on SIGTERM in {:.2} s",
        took.as_secs_f64()
    );
    stack.start_service("orders")?;
    m.wait_healthy().await?;
    for id in &ids {
        m.wait_order_state(*id, "OrderCompleted").await?;
    }
    m.wait_stock(product, (10, 10)).await
}

/// With the broker gone, `/health` answers 503 and names the broker. Runs last.
async fn health_names_a_missing_broker(stack: &mut Stack) -> Check {
    stack.broker = None; // kills tansu
    let m = &stack.mall();
    for base in [&m.orders, &m.products, &m.delivery] {
        eventually(
            &format!("{base}/health answers 503 naming the broker"),
            Duration::from_secs(30),
            || async move {
                let (status, body) = m.call("GET", &format!("{base}/health"), None).await?;
                let error = body["error"].as_str().unwrap_or_default();
                if status == 503 && error.contains("broker") && body["database"] == "ok" {
                    Ok(())
                } else {
                    Err(format!("{status} {body}"))
                }
            },
        )
        .await?;
    }
    Ok(())
}

async fn run(stack: &mut Stack) -> (usize, usize) {
    let m = stack.mall();
    if let Err(e) = m.wait_healthy().await {
        println!("FAIL start-up: {e}");
        return (0, 1);
    }
    let (mut passed, mut failed) = (0, 0);
    let mut report = |name: &str, started: Instant, result: Check| match result {
        Ok(()) => {
            passed += 1;
            println!("ok   {name} ({:.1} s)", started.elapsed().as_secs_f64());
        }
        Err(e) => {
            failed += 1;
            println!(
                "FAIL {name} ({:.1} s): {e}",
                started.elapsed().as_secs_f64()
            );
        }
    };
    macro_rules! scenario {
        ($name:literal, $run:expr) => {{
            let started = Instant::now();
            println!("...  {}", $name);
            let result = $run.await;
            report($name, started, result);
        }};
    }
    scenario!("happy path", scenarios::happy_path(&m));
    scenario!("out of stock", scenarios::out_of_stock(&m));
    scenario!("customer cancel", scenarios::customer_cancel(&m));
    scenario!("delivery-initiated cancel", scenarios::courier_cancel(&m));
    scenario!(
        "bad input gets clear errors",
        scenarios::bad_input_gets_clear_errors(&m)
    );
    scenario!(
        "malformed message parked on the DLT",
        scenarios::malformed_message_is_parked(&m)
    );
    scenario!(
        "100 concurrent orders against a stock of 30",
        scenarios::concurrent_orders(&m, 100, 30)
    );
    scenario!(
        "kill -9 of products mid-flight, then restart",
        products_killed_mid_flight(stack)
    );
    scenario!("every event delivered twice", async {
        let stop = tokio_util::sync::CancellationToken::new();
        let replayer = tokio::spawn(e2e::replay_everything_twice(
            m.brokers.clone(),
            m.topic.clone(),
            stop.clone(),
        ));
        let result = scenarios::every_event_twice(&m).await;
        stop.cancel();
        let _ = replayer.await;
        result
    });
    scenario!(
        "graceful stop (SIGTERM) of orders, then restart",
        graceful_stop(stack)
    );
    scenario!(
        "/health names a missing broker",
        health_names_a_missing_broker(stack)
    );
    (passed, failed)
}

fn argument(args: &[String], name: &str) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(bin_dir), Some(tansu)) = (argument(&args, "--bin-dir"), argument(&args, "--tansu"))
    else {
        eprintln!(
            "usage: stack-suite --bin-dir <dir with orders, products, delivery> --tansu <tansu binary>"
        );
        return ExitCode::from(2);
    };
    // The broker runs in the run directory, so relative paths would break.
    let (bin_dir, tansu) = match (bin_dir.canonicalize(), tansu.canonicalize()) {
        (Ok(b), Ok(t)) => (b, t),
        (b, t) => {
            eprintln!("--bin-dir {b:?} / --tansu {t:?}: both must exist");
            return ExitCode::from(2);
        }
    };
    let dir = match tempfile::Builder::new().prefix("mall-e2e-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("cannot create a run directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "real-broker suite: logs and databases in {}",
        dir.path().display()
    );
    let mut stack = match Stack::start(dir.path(), &bin_dir, &tansu) {
        Ok(stack) => stack,
        Err(e) => {
            println!("FAIL start-up: {e}");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    let (passed, failed) = tokio::select! {
        counts = run(&mut stack) => counts,
        _ = kafka::shutdown_signal() => {
            println!("interrupted");
            (0, 1)
        }
    };
    stack.stop();
    if failed > 0 {
        // Keep the logs for a look; the directory is printed above.
        let kept = dir.keep();
        println!("logs kept in {}", kept.display());
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
