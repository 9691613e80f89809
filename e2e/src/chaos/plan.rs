//! The fault plan: which faults, against which process, at which moment of the workload; all
//! drawn from the seeded [`Rng`], before the run starts, so a seed replays the same plan.
//! With several instances per service ([`plan_for`]) the faults name instances (`orders-2`):
//! a kill, a double kill, a stop or a SIGTERM hits one instance, a two-at-once kill two
//! different instances (of one service or of two).

use super::rng::Rng;
use crate::stack::{SERVICES, instance_name};
use std::fmt;
use std::time::Duration;

/// One fault: a kill (or stop) and the restart (or resume) that ends it. Faults run one at a
/// time; each is complete before the next begins.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// SIGKILL a service (instance), restart it.
    Kill {
        /// The service or instance.
        service: String,
    },
    /// SIGKILL a service, restart it, SIGKILL it again `again_after` after the restart (well
    /// within its session timeout, so its first new member is still in the group), restart.
    DoubleKill {
        /// The service or instance.
        service: String,
        /// How long the first restart lives.
        again_after: Duration,
    },
    /// SIGKILL two services (instances) at once, restart both.
    KillTwo {
        /// The services or instances.
        services: [String; 2],
    },
    /// SIGKILL the broker, wait `down_for`, restart it on the same port and storage.
    BrokerRestart {
        /// How long the broker stays down.
        down_for: Duration,
    },
    /// SIGSTOP a service for `stopped_for` (longer than its session timeout), then SIGCONT.
    Stop {
        /// The service or instance.
        service: String,
        /// How long it stays frozen.
        stopped_for: Duration,
    },
    /// SIGSTOP two services (instances) at once for `stopped_for` (long: a VM pause, a long
    /// stall), then SIGCONT both: they wake after their leases moved.
    StopTwo {
        /// The services or instances.
        services: [String; 2],
        /// How long they stay frozen.
        stopped_for: Duration,
    },
    /// SIGTERM a service, wait for it to exit by itself, restart it.
    Term {
        /// The service or instance.
        service: String,
    },
}

impl Fault {
    /// How many service SIGKILLs it sends (`--kills` counts these).
    pub fn kills(&self) -> u32 {
        match self {
            Fault::Kill { .. } => 1,
            Fault::DoubleKill { .. } | Fault::KillTwo { .. } => 2,
            _ => 0,
        }
    }

    /// What it does, for the report.
    pub fn label(&self) -> String {
        match self {
            Fault::Kill { .. } => "SIGKILL".into(),
            Fault::DoubleKill { again_after, .. } => format!(
                "SIGKILL, restart, SIGKILL again after {:.1} s",
                again_after.as_secs_f64()
            ),
            Fault::KillTwo { .. } => "SIGKILL two at once".into(),
            Fault::BrokerRestart { down_for } => format!(
                "SIGKILL broker, down {:.1} s, restart",
                down_for.as_secs_f64()
            ),
            Fault::Stop { stopped_for, .. } => {
                format!("SIGSTOP {:.1} s, SIGCONT", stopped_for.as_secs_f64())
            }
            Fault::StopTwo { stopped_for, .. } => {
                format!(
                    "SIGSTOP two at once {:.1} s, SIGCONT",
                    stopped_for.as_secs_f64()
                )
            }
            Fault::Term { .. } => "SIGTERM, wait, restart".into(),
        }
    }

    /// Which processes it hits.
    pub fn target(&self) -> String {
        match self {
            Fault::Kill { service }
            | Fault::DoubleKill { service, .. }
            | Fault::Stop { service, .. }
            | Fault::Term { service } => service.clone(),
            Fault::KillTwo { services } | Fault::StopTwo { services, .. } => services.join("+"),
            Fault::BrokerRestart { .. } => "broker".into(),
        }
    }

    /// The services (instances) whose `/health` says the fault is over; empty for the broker,
    /// whose restart every instance must survive.
    pub fn services(&self) -> Vec<String> {
        match self {
            Fault::Kill { service }
            | Fault::DoubleKill { service, .. }
            | Fault::Stop { service, .. }
            | Fault::Term { service } => vec![service.clone()],
            Fault::KillTwo { services } | Fault::StopTwo { services, .. } => services.to_vec(),
            Fault::BrokerRestart { .. } => Vec::new(),
        }
    }

    /// A rough guess of how long it takes, to spread the plan over the workload.
    pub fn estimate(&self) -> Duration {
        let secs = match self {
            Fault::Kill { .. } => 3.0,
            Fault::DoubleKill { again_after, .. } => 6.0 + again_after.as_secs_f64(),
            Fault::KillTwo { .. } => 4.0,
            Fault::BrokerRestart { down_for } => 7.0 + down_for.as_secs_f64(),
            Fault::Stop { stopped_for, .. } | Fault::StopTwo { stopped_for, .. } => {
                3.0 + stopped_for.as_secs_f64()
            }
            Fault::Term { .. } => 5.0,
        };
        Duration::from_secs_f64(secs)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.label(), self.target())
    }
}

/// How many faults of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Service SIGKILLs (each kill of a double kill counts).
    pub kills: u32,
    /// Broker SIGKILL + restarts.
    pub broker_restarts: u32,
    /// SIGSTOPs.
    pub stops: u32,
    /// Graceful SIGTERM restarts.
    pub terms: u32,
    /// Long pauses ([`LONG_PAUSE`]) of an orders and a products instance at once (the second
    /// instance of each when there are several).
    pub long_pauses: u32,
}

/// How long a long pause lasts: three lease times, so the instances wake long after their
/// partitions and the relay moved to the others.
pub const LONG_PAUSE: Duration = Duration::from_secs(30);

/// A fault and when (from the start of the workload) it should begin.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedFault {
    /// Planned start, from the start of the workload.
    pub at: Duration,
    /// The fault.
    pub fault: Fault,
}

/// The `i`-th of the `3 × instances` instances, services in [`SERVICES`] order.
fn nth_instance(i: usize, instances: usize) -> String {
    instance_name(SERVICES[i / instances], i % instances + 1, instances)
}

/// One instance at random (with one instance per service: one service, drawn as always).
fn service(rng: &mut Rng, instances: usize) -> String {
    let all = SERVICES.len() * instances;
    nth_instance(rng.below(all as u64) as usize, instances)
}

/// Two different instances at random.
fn two_services(rng: &mut Rng, instances: usize) -> [String; 2] {
    let all = SERVICES.len() * instances;
    let first = rng.below(all as u64) as usize;
    let second = (first + 1 + rng.below(all as u64 - 1) as usize) % all;
    [
        nth_instance(first, instances),
        nth_instance(second, instances),
    ]
}

fn double_kill(rng: &mut Rng, instances: usize) -> Fault {
    Fault::DoubleKill {
        service: service(rng, instances),
        again_after: Duration::from_secs_f64(rng.uniform(0.5, 2.0)),
    }
}

/// The service kills: exactly `kills` SIGKILLs; with 5 or more, at least one double kill and
/// one two-at-once kill.
fn kill_faults(rng: &mut Rng, kills: u32, instances: usize) -> Vec<Fault> {
    let mut faults = Vec::new();
    let mut left = kills;
    if kills >= 5 {
        faults.push(double_kill(rng, instances));
        faults.push(Fault::KillTwo {
            services: two_services(rng, instances),
        });
        left -= 4;
    }
    while left > 0 {
        let choice = if left >= 2 { rng.below(3) } else { 0 };
        let fault = match choice {
            0 => Fault::Kill {
                service: service(rng, instances),
            },
            1 => double_kill(rng, instances),
            _ => Fault::KillTwo {
                services: two_services(rng, instances),
            },
        };
        left -= fault.kills();
        faults.push(fault);
    }
    faults
}

/// Draws the plan: every fault of `counts` in random order, at random moments spread over
/// `window` (the expected length of the workload). Planned moments leave each fault its
/// estimated time; when the faults need more than the window, they are planned back to back
/// (and run on after the last order).
pub fn plan(rng: &mut Rng, counts: &Counts, window: Duration) -> Vec<PlannedFault> {
    plan_for(rng, counts, window, 1)
}

/// [`plan`] for `instances` instances per service: the faults name instances.
pub fn plan_for(
    rng: &mut Rng,
    counts: &Counts,
    window: Duration,
    instances: usize,
) -> Vec<PlannedFault> {
    let instances = instances.max(1);
    let mut faults = kill_faults(rng, counts.kills, instances);
    for _ in 0..counts.broker_restarts {
        faults.push(Fault::BrokerRestart {
            down_for: Duration::from_secs_f64(rng.uniform(0.5, 3.0)),
        });
    }
    for _ in 0..counts.stops {
        faults.push(Fault::Stop {
            service: service(rng, instances),
            stopped_for: Duration::from_secs_f64(rng.uniform(7.5, 9.0)),
        });
    }
    for _ in 0..counts.terms {
        faults.push(Fault::Term {
            service: service(rng, instances),
        });
    }
    let k = instances.min(2);
    for _ in 0..counts.long_pauses {
        faults.push(Fault::StopTwo {
            services: [
                instance_name("orders", k, instances),
                instance_name("products", k, instances),
            ],
            stopped_for: LONG_PAUSE,
        });
    }
    rng.shuffle(&mut faults);

    // The first fault not before 5 % of the window (orders must be flowing), the last one's
    // estimated end by 95 %; the slack is cut at random points between the faults.
    let start = window.mul_f64(0.05);
    let usable = window.mul_f64(0.90);
    let needed: Duration = faults.iter().map(Fault::estimate).sum();
    let slack = usable.saturating_sub(needed).as_secs_f64();
    let weights: Vec<f64> = (0..=faults.len())
        .map(|_| -(1.0 - rng.f64()).ln()) // exponential: a uniform cut of the slack
        .collect();
    let total: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut at = start;
    let mut planned = Vec::new();
    for (fault, weight) in faults.into_iter().zip(&weights) {
        at += Duration::from_secs_f64(slack * weight / total);
        let estimate = fault.estimate();
        planned.push(PlannedFault { at, fault });
        at += estimate;
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(kills: u32) -> Counts {
        Counts {
            kills,
            broker_restarts: 1,
            stops: 1,
            terms: 1,
            long_pauses: 0,
        }
    }

    #[test]
    fn every_kill_is_counted_and_the_mix_is_there() {
        for seed in 0..200 {
            for kills in [5, 6, 7, 20] {
                let plan = plan(&mut Rng::new(seed), &counts(kills), Duration::from_secs(20));
                let sent: u32 = plan.iter().map(|p| p.fault.kills()).sum();
                assert_eq!(sent, kills, "seed {seed}");
                assert!(
                    plan.iter()
                        .any(|p| matches!(p.fault, Fault::DoubleKill { .. }))
                );
                assert!(
                    plan.iter()
                        .any(|p| matches!(p.fault, Fault::KillTwo { .. }))
                );
                assert_eq!(
                    plan.iter()
                        .filter(|p| matches!(p.fault, Fault::BrokerRestart { .. }))
                        .count(),
                    1
                );
                assert_eq!(
                    plan.iter()
                        .filter(|p| matches!(p.fault, Fault::Stop { .. }))
                        .count(),
                    1
                );
                assert_eq!(
                    plan.iter()
                        .filter(|p| matches!(p.fault, Fault::Term { .. }))
                        .count(),
                    1
                );
            }
            for kills in 0..5 {
                let plan = plan(&mut Rng::new(seed), &counts(kills), Duration::from_secs(20));
                let sent: u32 = plan.iter().map(|p| p.fault.kills()).sum();
                assert_eq!(sent, kills);
            }
        }
    }

    #[test]
    fn faults_do_not_overlap_and_fit_a_long_window() {
        let window = Duration::from_secs(400);
        for seed in 0..100 {
            let plan = plan(&mut Rng::new(seed), &counts(20), window);
            for pair in plan.windows(2) {
                assert!(pair[0].at + pair[0].fault.estimate() <= pair[1].at);
            }
            let first = plan.first().map(|p| p.at).unwrap_or_default();
            let last = plan
                .last()
                .map(|p| p.at + p.fault.estimate())
                .unwrap_or_default();
            assert!(first >= window.mul_f64(0.05));
            assert!(last <= window.mul_f64(0.951), "seed {seed}: {last:?}");
        }
    }

    #[test]
    fn kill_two_hits_two_different_services() {
        let mut rng = Rng::new(3);
        for instances in [1, 2, 3] {
            for _ in 0..1000 {
                let [a, b] = two_services(&mut rng, instances);
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn with_instances_the_faults_name_instances() {
        for seed in 0..50 {
            for p in plan_for(&mut Rng::new(seed), &counts(7), Duration::from_secs(60), 3) {
                for target in p.fault.services() {
                    let (service, k) = target.rsplit_once('-').expect("an instance name");
                    assert!(SERVICES.contains(&service), "{target}");
                    assert!(["1", "2", "3"].contains(&k), "{target}");
                }
            }
        }
    }

    #[test]
    fn stops_outlast_the_session_timeout() {
        for seed in 0..100 {
            for p in plan(&mut Rng::new(seed), &counts(5), Duration::from_secs(20)) {
                if let Fault::Stop { stopped_for, .. } = p.fault {
                    assert!(stopped_for > crate::stack::SESSION_TIMEOUT + Duration::from_secs(1));
                }
                if let Fault::DoubleKill { again_after, .. } = p.fault {
                    assert!(again_after <= Duration::from_secs(2));
                }
            }
        }
    }

    #[test]
    fn a_seed_replays_the_same_plan() {
        let a = plan(&mut Rng::new(77), &counts(20), Duration::from_secs(60));
        let b = plan(&mut Rng::new(77), &counts(20), Duration::from_secs(60));
        assert_eq!(a, b);
    }
}
