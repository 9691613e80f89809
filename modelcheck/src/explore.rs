//! Breadth-first exploration of every state the model can reach, with a visited set of
//! 128-bit fingerprints, so the first broken invariant found is at the end of a shortest run;
//! that run is replayed to print it step by step.

use crate::invariants::{self, Broken, Invariant};
use crate::model::{Action, Model, Scenario, World};
use crate::rules::Rules;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// A broken invariant with the shortest run that breaks it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which invariant, and the order or product with its numbers.
    pub broken: Broken,
    /// The run, one step per line in the saga's words.
    pub trace: Vec<String>,
    /// Every order as the services see it at the end.
    pub end: String,
}

impl Violation {
    /// The invariant broken.
    pub fn invariant(&self) -> Invariant {
        self.broken.invariant
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invariant broken: {}", self.broken.invariant)?;
        writeln!(f, "  {}", self.broken.detail)?;
        writeln!(f, "shortest run ({} steps):", self.trace.len())?;
        for (n, step) in self.trace.iter().enumerate() {
            writeln!(f, "  {:>2}. {step}", n + 1)?;
        }
        writeln!(f, "at the end:")?;
        for line in self.end.lines() {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// What one exploration did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario, in words.
    pub scenario: String,
    /// Distinct states reached.
    pub states: usize,
    /// Transitions tried that changed something.
    pub transitions: usize,
    /// States where the saga had nothing left to do by itself.
    pub quiescent: usize,
    /// Steps in the longest shortest run.
    pub depth: usize,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// False when the state bound stopped the exploration early.
    pub complete: bool,
    /// The first broken invariant, with a shortest run to it.
    pub violation: Option<Violation>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.scenario)?;
        write!(
            f,
            "  {} states ({} quiescent), {} transitions, depth {}, {:.2} s{}",
            self.states,
            self.quiescent,
            self.transitions,
            self.depth,
            self.elapsed.as_secs_f64(),
            if self.complete {
                ""
            } else {
                " — STOPPED at the state bound"
            }
        )?;
        match &self.violation {
            Some(v) => write!(f, "\n{v}"),
            None => write!(f, "; every invariant holds"),
        }
    }
}

/// Explores every state of `scenario` with `rules`, stopping at the first broken invariant.
pub fn check(scenario: Scenario, rules: Rules) -> Report {
    let started = Instant::now();
    let description = scenario.to_string();
    let max_states = scenario.max_states;
    let mut model = Model::new(scenario, rules);
    let fingerprints = (RandomState::new(), RandomState::new());
    let fingerprint = |world: &World| {
        u128::from(fingerprints.0.hash_one(world)) << 64
            | u128::from(fingerprints.1.hash_one(world))
    };
    let initial = model.initial();
    let mut visited = HashSet::from([fingerprint(&initial)]);
    // How each state was first reached: (its parent's index, the action).
    let mut parents: Vec<Option<(usize, Action)>> = vec![None];
    let mut frontier = VecDeque::from([(initial.clone(), 0usize, 0usize)]);
    let mut report = Report {
        scenario: description,
        states: 1,
        transitions: 0,
        quiescent: 0,
        depth: 0,
        elapsed: Duration::ZERO,
        complete: true,
        violation: None,
    };
    let mut found = judge(&model, &initial, &mut report).err().map(|b| (b, 0));
    while let (None, Some((world, node, depth))) = (&found, frontier.pop_front()) {
        report.depth = report.depth.max(depth);
        for action in model.actions(&world) {
            let Some((next, _)) = model.apply(&world, action) else {
                continue;
            };
            report.transitions += 1;
            if !visited.insert(fingerprint(&next)) {
                continue;
            }
            parents.push(Some((node, action)));
            let child = parents.len() - 1;
            report.states += 1;
            if let Err(b) = judge(&model, &next, &mut report) {
                found = Some((b, child));
                break;
            }
            if report.states >= max_states {
                report.complete = false;
                frontier.clear();
                break;
            }
            frontier.push_back((next, child, depth + 1));
        }
    }
    report.violation = found.map(|(broken, node)| {
        let mut actions = Vec::new();
        let mut at = node;
        while let Some((parent, action)) = parents[at] {
            actions.push(action);
            at = parent;
        }
        actions.reverse();
        replay(&mut model, initial, &actions, broken)
    });
    report.elapsed = started.elapsed();
    report
}

/// Checks a state's invariants, counting it if quiescent.
fn judge(model: &Model, world: &World, report: &mut Report) -> Result<(), Broken> {
    invariants::always(model, world)?;
    if model.quiescent(world) {
        report.quiescent += 1;
        invariants::at_quiescence(model, world)?;
    }
    Ok(())
}

/// Runs `actions` again from the start, describing each step.
fn replay(model: &mut Model, initial: World, actions: &[Action], broken: Broken) -> Violation {
    let mut world = initial;
    let mut trace = Vec::new();
    for &action in actions {
        match model.apply(&world, action) {
            Some((next, effect)) => {
                trace.push(model.describe(action, &effect));
                world = next;
            }
            None => trace.push(format!("{action:?} (could not be replayed)")),
        }
    }
    Violation {
        broken,
        trace,
        end: model.summary(&world),
    }
}
