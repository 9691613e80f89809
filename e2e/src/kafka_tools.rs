//! Scenarios on Apache Kafka only: the seed lab's console tools run verbatim against the mall
//! (`scripts/kafka/bin`), Kafka's own view of each service's progress agrees with `/health`,
//! and a service refuses positions that belong to another cluster.

use crate::stack::Stack;
use crate::{Check, Mall, eventually, read_topic};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `tool` (a script of `scripts/kafka/bin`) with `args`, `stdin` fed to it; its stdout,
/// or an error with its stderr when it fails.
async fn run_tool(tools: &Path, tool: &str, args: &[&str], stdin: Option<String>) -> Check<String> {
    let program = tools.join(tool);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{} {args:?} exited with {}: {}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The seed lab's bootstrap address for this stack: `http://` and the first broker.
fn seed_bootstrap(m: &Mall) -> String {
    format!("http://{}", m.brokers.split(',').next().unwrap_or_default())
}

/// An order's saga, then the seed lab's `kafka-console-consumer.sh --bootstrap-server
/// http://… --topic eventTopic --from-beginning` prints every event on the topic, the order's
/// forward events among them, one JSON object a line; `kafka-topics` (without `.sh`) lists the
/// topic and its dead-letter topic with the settings the services gave them; a line sent with
/// `kafka-console-producer.sh` reaches the topic.
pub async fn seed_console_tools_work_verbatim(m: &Mall, tools: &Path) -> Check {
    let product = m.create_product("console", 5).await?;
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let on_topic = read_topic(&m.brokers, &m.topic).await?.len();
    let printed = run_tool(
        tools,
        "kafka-console-consumer.sh",
        &[
            "--bootstrap-server",
            &seed_bootstrap(m),
            "--topic",
            "eventTopic",
            "--from-beginning",
            "--max-messages",
            &on_topic.to_string(),
            "--timeout-ms",
            "60000",
        ],
        None,
    )
    .await?;
    let lines: Vec<&str> = printed.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != on_topic {
        return Err(format!(
            "the console consumer printed {} lines for {on_topic} messages on the topic",
            lines.len()
        ));
    }
    let mut of_order = Vec::new();
    for line in &lines {
        // Messages injected by other scenarios (malformed, poison) are not JSON.
        if let Ok(event) = serde_json::from_str::<Value>(line)
            && event["orderId"] == order
        {
            of_order.push(event["eventType"].as_str().unwrap_or_default().to_owned());
        }
    }
    for expected in [
        "OrderPlaced",
        "StockDecreased",
        "DeliveryStarted",
        "OrderCompleted",
    ] {
        if !of_order.iter().any(|t| t == expected) {
            return Err(format!(
                "the console consumer's output has no {expected} of order {order}: {of_order:?}"
            ));
        }
    }
    let listed = run_tool(
        tools,
        "kafka-topics",
        &["--bootstrap-server", &seed_bootstrap(m), "--list"],
        None,
    )
    .await?;
    let topics: Vec<&str> = listed.lines().map(str::trim).collect();
    if !topics.contains(&"eventTopic") || !topics.contains(&"eventTopic.DLT") {
        return Err(format!("kafka-topics --list: {topics:?}"));
    }
    let described = run_tool(
        tools,
        "kafka-topics.sh",
        &[
            "--bootstrap-server",
            &m.brokers,
            "--describe",
            "--topic",
            "eventTopic",
        ],
        None,
    )
    .await?;
    for setting in [
        "min.insync.replicas=",
        "retention.ms=604800000",
        "segment.ms=86400000",
    ] {
        if !described.contains(setting) {
            return Err(format!(
                "kafka-topics --describe lacks {setting}: {described}"
            ));
        }
    }
    let marker = format!("sent with kafka-console-producer {}", uuid::Uuid::new_v4());
    run_tool(
        tools,
        "kafka-console-producer.sh",
        &[
            "--bootstrap-server",
            &seed_bootstrap(m),
            "--topic",
            "eventTopic",
        ],
        Some(format!("{marker}\n")),
    )
    .await?;
    eventually(
        "the console producer's line is on the topic",
        Duration::from_secs(20),
        || async {
            let messages = read_topic(&m.brokers, &m.topic).await?;
            if messages.iter().any(|msg| msg.raw.contains(&marker)) {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await
}

/// Each service's position and lag on every partition it reads, from `/health`.
async fn health_positions(m: &Mall, url: &str) -> Check<BTreeMap<i32, (i64, i64)>> {
    let (status, health) = m.call("GET", &format!("{url}/health"), None).await?;
    if status != 200 {
        return Err(format!("{url}/health answered {status}: {health}"));
    }
    let partitions = health["consumer"]["partitions"]
        .as_object()
        .ok_or_else(|| format!("{url}/health has no consumer partitions: {health}"))?;
    partitions
        .iter()
        .map(|(p, v)| {
            let p: i32 = p.parse().map_err(|_| format!("partition {p:?}"))?;
            let position = v["position"].as_i64().ok_or("no position")?;
            let lag = v["lag"].as_i64().ok_or("no lag")?;
            Ok((p, (position, lag)))
        })
        .collect()
}

/// Once the mall is quiet (every service's `/health` shows lag 0), `kafka-consumer-groups.sh
/// --describe --all-groups` shows a group per service on `eventTopic` whose current offset
/// is the position `/health` shows, with lag 0.
pub async fn consumer_groups_show_each_service(stack: &Stack, tools: &Path) -> Check {
    let m = stack.mall();
    let product = m.create_product("groups", 5).await?;
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    // Each instance shows the partitions it reads; together they read them all.
    let services: Vec<(&str, Vec<String>)> = ["orders", "products", "delivery"]
        .into_iter()
        .map(|s| (s, stack.instances(s).iter().map(|i| stack.url(i)).collect()))
        .collect();
    eventually(
        "Kafka's groups agree with /health",
        Duration::from_secs(30),
        || async {
            let mut health = BTreeMap::new();
            for (service, urls) in &services {
                let mut positions = BTreeMap::new();
                for url in urls {
                    positions.extend(health_positions(&m, url).await?);
                }
                if positions.values().any(|(_, lag)| *lag != 0) {
                    return Err(format!("{service} still has lag: {positions:?}"));
                }
                health.insert(*service, positions);
            }
            let described = run_tool(
                tools,
                "kafka-consumer-groups.sh",
                &[
                    "--bootstrap-server",
                    &m.brokers,
                    "--describe",
                    "--all-groups",
                ],
                None,
            )
            .await?;
            // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
            let mut shown: BTreeMap<String, BTreeMap<i32, (i64, i64)>> = BTreeMap::new();
            for line in described.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() >= 6
                    && f[1] == "eventTopic"
                    && let (Ok(p), Ok(current), Ok(lag)) = (
                        f[2].parse::<i32>(),
                        f[3].parse::<i64>(),
                        f[5].parse::<i64>(),
                    )
                {
                    shown
                        .entry(f[0].to_owned())
                        .or_default()
                        .insert(p, (current, lag));
                }
            }
            for (service, positions) in &health {
                let in_kafka = shown.get(*service).ok_or_else(|| {
                    format!("no group {service} in kafka-consumer-groups: {described}")
                })?;
                let expected: BTreeMap<i32, (i64, i64)> = positions
                    .iter()
                    .map(|(p, (pos, _))| (*p, (*pos, 0)))
                    .collect();
                if *in_kafka != expected {
                    return Err(format!(
                        "{service}: kafka-consumer-groups shows {in_kafka:?}, /health {expected:?}"
                    ));
                }
            }
            Ok(())
        },
    )
    .await
}

/// The broker's storage is wiped (a new cluster) while products' database keeps its
/// positions: products refuses to start, naming the clusters and the fix, instead of reading
/// the new topic from positions that belong to the old one. Leaves the stack on the new
/// broker with products stopped: run it last.
pub async fn positions_of_another_cluster_are_refused(stack: &mut Stack) -> Check {
    let products = stack.instance_name("products", 1);
    // Every instance stopped: a live sibling would be no different from a restarted one.
    for instance in stack.instances("products") {
        if stack.is_running(&instance) {
            stack.sigkill(&instance)?;
        }
    }
    stack.wipe_broker().await?;
    stack.start_service(&products)?;
    let status = stack
        .wait_exited(&products, Duration::from_secs(60))
        .await
        .map_err(|e| format!("products started on a wiped broker with its old positions: {e}"))?;
    if status.success() {
        return Err("products exited with success on a wiped broker".into());
    }
    match stack.log_line(&products, "belong to Kafka cluster") {
        Some(line) if line.contains("KAFKA_BROKERS") && line.contains("scripts/down.sh --wipe") => {
            println!("    products refused: {line}");
            Ok(())
        }
        other => Err(format!(
            "products exited ({status}) without naming the other cluster and the fix: {other:?}"
        )),
    }
}

/// `scripts/kafka/bin` of the checkout the suite runs from (the scripts run it from there).
pub fn default_tools_dir() -> PathBuf {
    PathBuf::from("scripts/kafka/bin")
}
