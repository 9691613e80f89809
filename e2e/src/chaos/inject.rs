//! Carrying out one planned fault on the running [`Stack`], from the first signal to the
//! moment the services (instances) it hit answer `/health` 200 again — every instance after a
//! broker restart.

use super::client::Client;
use super::plan::Fault;
use crate::stack::Stack;
use std::time::{Duration, Instant};

/// How long a service may take to answer `/health` 200 after a fault.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between a SIGKILL and the restart.
const RESTART_AFTER: Duration = Duration::from_millis(500);
/// How long a SIGTERMed service may take to exit.
const TERM_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened when a fault was carried out.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// When it began, from the start of the workload.
    pub offset: Duration,
    /// The fault.
    pub fault: Fault,
    /// From the first signal until every service it hit answered /health 200 again; `None`
    /// if they did not within [`RECOVERY_TIMEOUT`].
    pub recovered_after: Option<Duration>,
    /// When the last process was restarted (or resumed).
    pub last_restart: Instant,
    /// What went wrong while carrying it out (a service that did not stop on SIGTERM, one that
    /// exited while restarting, …).
    pub problems: Vec<String>,
    /// Extra facts for the report (how long a SIGTERM took).
    pub notes: Vec<String>,
}

/// The base URL of a service (instance) on the stack.
fn url(stack: &Stack, service: &str) -> String {
    stack.url(service)
}

/// Waits until each service (instance) answers /health 200; one that exits meanwhile is
/// reported and started again (up to 3 times). Returns false on timeout.
pub async fn wait_healthy(
    stack: &mut Stack,
    client: &Client,
    services: &[String],
    timeout: Duration,
    problems: &mut Vec<String>,
) -> bool {
    let start = Instant::now();
    let mut restarts = 0;
    for service in services {
        loop {
            for (name, status) in stack.reap_exited() {
                problems.push(format!("{name} exited by itself ({status})"));
                if restarts < 3 {
                    restarts += 1;
                    let restarted = if stack.is_broker(&name) {
                        stack.restart_broker().await
                    } else {
                        stack.restart_service(&name)
                    };
                    if let Err(e) = restarted {
                        problems.push(format!("restarting {name}: {e}"));
                    }
                }
            }
            if client.health(&url(stack, service)).await == Ok(200) {
                break;
            }
            if start.elapsed() > timeout {
                problems.push(format!("{service} not healthy within {timeout:?}"));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    true
}

/// In a Kafka cluster: SIGKILLs the node leading the busiest partition of the saga topic
/// (partition 0: every product's catalog events and most orders' land there with one
/// partition; with more, it is as busy as any), keeps it down for `down_for`, and starts it
/// again on the same storage. Its partitions' leadership moves to an in-sync replica
/// (`unclean.leader.election.enable=false`), so no acknowledged event is lost.
async fn kill_partition_leader(
    stack: &mut Stack,
    down_for: Duration,
    at: &impl Fn(&str),
    problems: &mut Vec<String>,
) {
    let brokers = stack.brokers().to_owned();
    let leader = tokio::task::spawn_blocking(move || {
        crate::broker::leader_of(&brokers, crate::stack::TOPIC, 0)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let leader = match leader {
        Ok(id) => id,
        Err(e) => {
            problems.push(format!(
                "finding the leader of {}[0]: {e}",
                crate::stack::TOPIC
            ));
            return;
        }
    };
    at(&format!(
        "SIGKILL broker node {leader}, the leader of {}[0]",
        crate::stack::TOPIC
    ));
    if let Err(e) = stack.kill_broker_node(leader) {
        problems.push(e);
        return;
    }
    tokio::time::sleep(down_for).await;
    at(&format!("restarting broker node {leader} on its storage"));
    if let Err(e) = stack.restart_broker_node(leader).await {
        problems.push(format!("restart broker node {leader}: {e}"));
    }
}

fn restart(stack: &mut Stack, service: &str, problems: &mut Vec<String>) {
    if let Err(e) = stack.restart_service(service) {
        problems.push(format!("restart {service}: {e}"));
    }
}

fn kill(stack: &mut Stack, service: &str, problems: &mut Vec<String>) {
    if let Err(e) = stack.sigkill(service) {
        problems.push(format!("SIGKILL {service}: {e}"));
    }
}

/// Carries out `fault`, printing what it does; `t0` is the start of the workload.
pub async fn execute(
    stack: &mut Stack,
    client: &Client,
    fault: &Fault,
    t0: Instant,
) -> FaultRecord {
    let began = Instant::now();
    let offset = began.duration_since(t0);
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let at = |what: &str| println!("  +{:6.1} s  {what}", t0.elapsed().as_secs_f64());
    match fault {
        Fault::Kill { service } => {
            at(&format!("SIGKILL {service}"));
            kill(stack, service, &mut problems);
            tokio::time::sleep(RESTART_AFTER).await;
            restart(stack, service, &mut problems);
        }
        Fault::DoubleKill {
            service,
            again_after,
        } => {
            at(&format!("SIGKILL {service}"));
            kill(stack, service, &mut problems);
            tokio::time::sleep(RESTART_AFTER).await;
            restart(stack, service, &mut problems);
            tokio::time::sleep(*again_after).await;
            at(&format!(
                "SIGKILL {service} again, {:.1} s after its restart",
                again_after.as_secs_f64()
            ));
            kill(stack, service, &mut problems);
            tokio::time::sleep(RESTART_AFTER).await;
            restart(stack, service, &mut problems);
        }
        Fault::KillTwo { services } => {
            at(&format!(
                "SIGKILL {} and {} at once",
                services[0], services[1]
            ));
            for s in services {
                kill(stack, s, &mut problems);
            }
            tokio::time::sleep(RESTART_AFTER).await;
            for s in services {
                restart(stack, s, &mut problems);
            }
        }
        Fault::BrokerRestart { down_for } => {
            if stack.broker_nodes().len() > 1 {
                kill_partition_leader(stack, *down_for, &at, &mut problems).await;
            } else {
                let broker = stack.broker_kind().name();
                at(&format!("SIGKILL {broker}"));
                stack.kill_broker();
                tokio::time::sleep(*down_for).await;
                at(&format!("restarting {broker} on the same port and storage"));
                if let Err(e) = stack.restart_broker().await {
                    problems.push(format!("restart {broker}: {e}"));
                }
            }
        }
        Fault::Stop {
            service,
            stopped_for,
        } => {
            at(&format!(
                "SIGSTOP {service} for {:.1} s",
                stopped_for.as_secs_f64()
            ));
            if let Err(e) = stack.sigstop(service) {
                problems.push(e);
            }
            tokio::time::sleep(*stopped_for).await;
            at(&format!("SIGCONT {service}"));
            if let Err(e) = stack.sigcont(service) {
                problems.push(e);
            }
        }
        Fault::StopTwo {
            services,
            stopped_for,
        } => {
            at(&format!(
                "SIGSTOP {} and {} for {:.1} s",
                services[0],
                services[1],
                stopped_for.as_secs_f64()
            ));
            for s in services {
                if let Err(e) = stack.sigstop(s) {
                    problems.push(e);
                }
            }
            tokio::time::sleep(*stopped_for).await;
            at(&format!("SIGCONT {} and {}", services[0], services[1]));
            for s in services {
                if let Err(e) = stack.sigcont(s) {
                    problems.push(e);
                }
            }
        }
        Fault::Term { service } => {
            at(&format!("SIGTERM {service}"));
            match stack.sigterm_and_wait(service, TERM_TIMEOUT).await {
                Ok(took) => notes.push(format!("stopped in {:.1} s", took.as_secs_f64())),
                Err(e) => problems.push(e),
            }
            restart(stack, service, &mut problems);
        }
    }
    let last_restart = Instant::now();
    let services = fault.services();
    let everything = services.is_empty();
    let services = if everything {
        stack.all_instances()
    } else {
        services
    };
    let healthy = wait_healthy(stack, client, &services, RECOVERY_TIMEOUT, &mut problems).await;
    let recovered_after = healthy.then(|| began.elapsed());
    match recovered_after {
        Some(d) => at(&format!(
            "{} healthy again, {:.1} s after the fault began",
            if everything {
                "all services".to_owned()
            } else {
                services.join(" and ")
            },
            d.as_secs_f64()
        )),
        None => at(&format!("{} did NOT recover", fault.target())),
    }
    FaultRecord {
        offset,
        fault: fault.clone(),
        recovered_after,
        last_restart,
        problems,
        notes,
    }
}
