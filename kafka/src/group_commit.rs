//! Group commit: the writes waiting at one moment share one transaction, each in its own
//! savepoint, on a writer thread.
//!
//! On SQLite a service's writes are serialized anyway (see [`crate::db`]), so a write mostly
//! waits for the ones before it; what it pays on its own is the transaction around it — taking
//! the write lock, revalidating the connection's page cache after another connection's commit,
//! and the commit writing every page it touched to the log. Under load a dozen POSTs and a
//! consumer batch touch the same few pages: committed together, they write them once.
//!
//! On PostgreSQL a write locks only what it decides on, and every statement is a round trip:
//! with the server a millisecond away, one writer's transactions, one at a time, cap an
//! instance near 25 sagas/s with its CPU idle. So there are several writer threads: the first
//! takes every write waiting when it is free, and the others take those it leaves waiting
//! past [`SPILL_AFTER`] — a local server, whose transactions take a millisecond or two, keeps
//! the grouping (and the commits) of one writer; a distant one gets the writers side by side.
//!
//! The events the writes cause (the service's history rows, the outbox rows) are recorded
//! once for the whole transaction, after its last write and before its commit, in the writes'
//! order: a statement per table rather than per write. If they cannot be recorded, the writes
//! whose own events are refused fail as if alone, and the others with a transient error.
//!
//! Nothing is weakened: a write is answered only after the transaction holding it committed;
//! a write that fails (or panics) rolls back to its savepoint alone, as if it had been its own
//! transaction; a failed commit fails every write in it, and nothing of them is kept. The
//! first write of a transaction needs no savepoint (the transaction rolls back as well, and the
//! others then run in a new one), and gets none: a savepoint is a statement more, and SQLite
//! copies every page a savepoint touches to a sub-journal first. A write's savepoint is
//! released with the next one's `SAVEPOINT` (one round trip), or by the `COMMIT`. A writer
//! keeps its connection while its transactions commit: a checkout from the pool tests the
//! connection with a statement of its own.

use crate::db::{AfterCommit, DbConnection, DbError, Notices, Pool, Recorder, write_transaction};
use diesel::connection::SimpleConnection;
use events::Envelope;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most writes in one transaction: enough to absorb a burst of POSTs with the consumer's
/// batch, few enough that one commit stays short.
const MOST_PER_COMMIT: usize = 64;

/// The savepoint of each write after a transaction's first; one name, as one is open at a time.
const SAVEPOINT: &str = "group_write";

/// Whether the transaction has a write's savepoint still open (the write succeeded): the
/// next write's `SAVEPOINT` releases it in the same round trip, and the `COMMIT` releases the
/// last.
#[derive(Debug, Default)]
pub(crate) struct Savepoint {
    open: bool,
}

impl Savepoint {
    /// Opens the next write's savepoint, releasing the last one's.
    fn open(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<()> {
        if self.open {
            conn.batch_execute(&format!(
                "RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}"
            ))?;
        } else {
            conn.batch_execute(&format!("SAVEPOINT {SAVEPOINT}"))?;
        }
        self.open = true;
        Ok(())
    }

    /// Undoes the write since its savepoint, and drops the savepoint.
    fn roll_back(&mut self, conn: &mut DbConnection) -> diesel::QueryResult<()> {
        self.open = false;
        conn.batch_execute(&format!(
            "ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
        ))
    }
}

/// One write waiting for the writer thread.
pub(crate) trait Write: Send {
    /// Runs the write in its own savepoint of the open transaction and returns how to answer
    /// once the commit's outcome is known, or `Err` when the transaction itself can no longer
    /// be used.
    fn run(
        self: Box<Self>,
        conn: &mut DbConnection,
        savepoint: &mut Savepoint,
    ) -> Result<Box<dyn Answer>, (Box<dyn Answer>, DbError)>;

    /// Runs the write as the only one of the open transaction, without a savepoint: the
    /// transaction is its rollback. Also returns whether the write succeeded (else the
    /// caller rolls the transaction back).
    fn run_alone(self: Box<Self>, conn: &mut DbConnection) -> (Box<dyn Answer>, bool);

    /// Answers without running: the transaction could not even begin.
    fn fail(self: Box<Self>, cause: DbError);
}

/// How a write that ran is answered.
pub(crate) trait Answer: Send {
    /// The events the write caused, if it succeeded and caused any, and how they are
    /// recorded: taken by the writer, which records those of every write of the transaction
    /// at once before the commit.
    fn take_events(&mut self) -> Option<(Recorder, Vec<Envelope>)>;

    /// Answers with the transaction's outcome.
    fn answer(self: Box<Self>, outcome: Outcome);
}

/// What became of the transaction a write ran in.
pub(crate) enum Outcome<'a> {
    /// It committed.
    Committed,
    /// It rolled back: why.
    RolledBack(&'a str),
    /// It rolled back because this write's own events could not be recorded: the write's
    /// failure, as if the write had failed itself.
    EventsRefused(Refused),
}

/// Why a write's events could not be recorded.
pub(crate) enum Refused {
    /// The database refused them.
    Query(diesel::result::Error),
    /// The service's write hook panicked on them: a bug, which fails the write as a panic in
    /// the write itself would (`DbError::Task`, so a consumer parks the event).
    Panicked(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Query(e) => e.fmt(f),
            Refused::Panicked(message) => write!(f, "the write hook panicked: {message}"),
        }
    }
}

/// [`Recorder::record`], a panic in the service's hook caught as the write's failure.
fn record_caught(
    recorder: &Recorder,
    conn: &mut DbConnection,
    events: &[Envelope],
) -> Result<Option<AfterCommit>, Refused> {
    match catch_unwind(AssertUnwindSafe(|| recorder.record(conn, events))) {
        Ok(recorded) => recorded.map_err(Refused::Query),
        Err(panic) => Err(Refused::Panicked(panic_message(&*panic).to_owned())),
    }
}

/// A write of [`crate::Database::write`]: the caller's closure, which returns its result and
/// the events it caused, how those are recorded, and where to send the result (and whether
/// it caused events).
pub(crate) struct Job<F, T, E> {
    pub(crate) work: F,
    pub(crate) recorder: Recorder,
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<(T, bool), E>>,
}

struct Ran<T, E> {
    outcome: Result<(T, Vec<Envelope>), E>,
    /// Whether it caused events (taken from `outcome` to be recorded).
    caused: bool,
    recorder: Recorder,
    reply: tokio::sync::oneshot::Sender<Result<(T, bool), E>>,
}

impl<T, E> Ran<T, E> {
    fn new(
        outcome: Result<(T, Vec<Envelope>), E>,
        recorder: Recorder,
        reply: tokio::sync::oneshot::Sender<Result<(T, bool), E>>,
    ) -> Self {
        Ran {
            outcome,
            caused: false,
            recorder,
            reply,
        }
    }
}

impl<T, E> Answer for Ran<T, E>
where
    T: Send,
    E: From<DbError> + From<diesel::result::Error> + Send,
{
    fn take_events(&mut self) -> Option<(Recorder, Vec<Envelope>)> {
        match &mut self.outcome {
            Ok((_, events)) if !events.is_empty() => {
                self.caused = true;
                Some((self.recorder.clone(), std::mem::take(events)))
            }
            _ => None,
        }
    }

    fn answer(self: Box<Self>, outcome: Outcome) {
        let caused = self.caused;
        let result = match outcome {
            // Its events, if any, were taken to be recorded before the commit.
            Outcome::Committed => self.outcome.map(|(value, _)| (value, caused)),
            // Its own failure says more than the transaction's.
            Outcome::RolledBack(_) if self.outcome.is_err() => {
                self.outcome.map(|(value, _)| (value, false))
            }
            Outcome::RolledBack(why) => Err(E::from(DbError::Batch(why.to_owned()))),
            Outcome::EventsRefused(Refused::Query(e)) => Err(E::from(e)),
            Outcome::EventsRefused(Refused::Panicked(message)) => {
                Err(E::from(DbError::Task(format!("panicked: {message}"))))
            }
        };
        // The caller may have stopped waiting; the write's fate is decided all the same.
        let _ = self.reply.send(result);
    }
}

impl<F, T, E> Write for Job<F, T, E>
where
    F: FnOnce(&mut DbConnection) -> Result<(T, Vec<Envelope>), E> + Send + 'static,
    T: Send + 'static,
    E: From<DbError> + From<diesel::result::Error> + Send + 'static,
{
    fn run(
        self: Box<Self>,
        conn: &mut DbConnection,
        savepoint: &mut Savepoint,
    ) -> Result<Box<dyn Answer>, (Box<dyn Answer>, DbError)> {
        let Job {
            work,
            recorder,
            reply,
        } = *self;
        if let Err(e) = savepoint.open(conn) {
            let outcome = Err(E::from(DbError::Batch(e.to_string())));
            return Err((
                Box::new(Ran::new(outcome, recorder, reply)),
                DbError::Query(e),
            ));
        }
        let outcome = run_caught(work, conn);
        let closed = match &outcome {
            Ok(_) => Ok(()),
            Err(_) => savepoint.roll_back(conn),
        };
        let ran = Box::new(Ran::new(outcome, recorder, reply));
        match closed {
            Ok(()) => Ok(ran),
            Err(e) => Err((ran, DbError::Query(e))),
        }
    }

    fn run_alone(self: Box<Self>, conn: &mut DbConnection) -> (Box<dyn Answer>, bool) {
        let Job {
            work,
            recorder,
            reply,
        } = *self;
        let outcome = run_caught(work, conn);
        let succeeded = outcome.is_ok();
        (Box::new(Ran::new(outcome, recorder, reply)), succeeded)
    }

    fn fail(self: Box<Self>, cause: DbError) {
        let _ = self.reply.send(Err(E::from(cause)));
    }
}

/// Runs `work`; a panic in it becomes its error (`DbError::Task`, so a consumer parks the event).
fn run_caught<F, T, E>(work: F, conn: &mut DbConnection) -> Result<T, E>
where
    F: FnOnce(&mut DbConnection) -> Result<T, E>,
    E: From<DbError>,
{
    match catch_unwind(AssertUnwindSafe(|| work(conn))) {
        Ok(outcome) => outcome,
        Err(panic) => Err(E::from(DbError::Task(format!(
            "panicked: {}",
            panic_message(&*panic)
        )))),
    }
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// How long a write waits for the first writer thread before a free one of the others takes
/// it. The first takes every write at once when it is free, so while it keeps up (short
/// transactions: a local server) the writes of a moment share its transactions, and their
/// commits; when its transaction takes longer (a round trip per statement to a distant server,
/// a lock wait), the writes queued behind it go to another writer instead of waiting for it.
const SPILL_AFTER: Duration = Duration::from_millis(5);

/// How long one transaction's writes should take together, when there are other writers to
/// take the rest: a writer takes no more writes than its last transactions ran in that time
/// ([`Pace`]). With a local server that is [`MOST_PER_COMMIT`]; with a round trip of a few
/// milliseconds per statement, a handful, so that no write waits behind sixty others'
/// statements while another writer is free. One writer alone takes all it may: the rest
/// would only wait for it.
const TRANSACTION_BUDGET: Duration = Duration::from_millis(100);

/// How long a writer's writes take, one with another, by its last transactions.
#[derive(Debug, Default, Clone, Copy)]
struct Pace {
    per_write: Option<Duration>,
}

impl Pace {
    /// The most writes the next transaction takes.
    fn most(&self) -> usize {
        let Some(per_write) = self.per_write else {
            return MOST_PER_COMMIT;
        };
        let fit = TRANSACTION_BUDGET.as_micros() / per_write.as_micros().max(1);
        usize::try_from(fit)
            .unwrap_or(MOST_PER_COMMIT)
            .clamp(1, MOST_PER_COMMIT)
    }

    /// A transaction of `writes` took `took`, begin to commit: weighs in by a quarter.
    fn ran(&mut self, writes: usize, took: Duration) {
        let sample = took / u32::try_from(writes.max(1)).unwrap_or(u32::MAX);
        self.per_write = Some(match self.per_write {
            None => sample,
            Some(before) => (before * 3 + sample) / 4,
        });
    }
}

/// The writes waiting for a writer thread, oldest first.
struct Queue {
    waiting: Mutex<Waiting>,
    /// Signalled when a write arrives or the queue closes.
    changed: Condvar,
}

struct Waiting {
    writes: VecDeque<(Instant, Box<dyn Write>)>,
    /// No more writes come; the writers finish what waits, then stop.
    closed: bool,
}

impl Queue {
    fn new() -> Self {
        Queue {
            waiting: Mutex::new(Waiting {
                writes: VecDeque::new(),
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // A panic never happens while it is held (the writes run outside it).
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, write: Box<dyn Write>) -> Result<(), ()> {
        let mut waiting = self.lock();
        if waiting.closed {
            return Err(());
        }
        waiting.writes.push_back((Instant::now(), write));
        self.changed.notify_all();
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// The next batch (up to `most`) for a writer: the first writer takes what waits at
    /// once, the others only once the oldest has waited [`SPILL_AFTER`]. `None` once the
    /// queue is closed and empty.
    fn take(&self, first_writer: bool, most: usize) -> Option<Vec<Box<dyn Write>>> {
        let mut waiting = self.lock();
        loop {
            let waited = waiting.writes.front().map(|(since, _)| since.elapsed());
            waiting = match waited {
                Some(waited) if first_writer || waited >= SPILL_AFTER => {
                    let n = waiting.writes.len().min(most.max(1));
                    return Some(waiting.writes.drain(..n).map(|(_, write)| write).collect());
                }
                Some(waited) => {
                    let wait = SPILL_AFTER - waited;
                    self.changed
                        .wait_timeout(waiting, wait)
                        .map_or_else(|poisoned| poisoned.into_inner().0, |(waiting, _)| waiting)
                }
                None if waiting.closed => return None,
                None => self
                    .changed
                    .wait(waiting)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }
}

/// The writer threads and where [`crate::Database::write`] queues its writes. Dropping it
/// (with the last `Database` clone) closes the queue and waits for the threads to finish what
/// waits and drop their pool handles, so the database's connections are closed when the last
/// `Database` is gone, as before the writer existed (a test reopening the file relies on it).
pub(crate) struct Writer {
    /// Where writes wait for a writer thread; closed first when the last handle goes.
    queue: Arc<Queue>,
    /// The writer threads, joined after the queue closed: each commits what still waits,
    /// then drops its pool handle.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Queues a write; `Err` when the writers are stopping.
    pub(crate) fn send(&self, write: Box<dyn Write>) -> Result<(), ()> {
        self.queue.push(write)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.close();
        for thread in self.threads.drain(..) {
            // The last handle may go inside a write, on a writer thread itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Starts `writers` writer threads (at least one), which take a connection from `pool` for
/// each transaction and announce their PostgreSQL commits as `notices` say. With one, every
/// write of a moment shares its transaction; more (PostgreSQL, whose writes lock only what
/// they decide on) take the writes the first leaves waiting ([`SPILL_AFTER`]).
pub(crate) fn start(
    name: &str,
    writers: usize,
    pool: Pool,
    notices: Arc<Notices>,
) -> std::io::Result<Writer> {
    let mut writer = Writer {
        queue: Arc::new(Queue::new()),
        threads: Vec::with_capacity(writers),
    };
    for n in 0..writers.max(1) {
        let (queue, pool, notices) = (writer.queue.clone(), pool.clone(), notices.clone());
        // On a failure, dropping `writer` stops the threads already started.
        let thread = std::thread::Builder::new()
            .name(if writers > 1 {
                format!("{name}-{n}")
            } else {
                name.to_owned()
            })
            .spawn(move || write_until_closed(&queue, n == 0, writers > 1, &pool, &notices))?;
        writer.threads.push(thread);
    }
    Ok(writer)
}

/// One writer thread: commits the batches it takes from `queue`, until it is closed and empty;
/// `paced` (there are other writers): no more than [`TRANSACTION_BUDGET`] allows.
fn write_until_closed(
    queue: &Queue,
    first_writer: bool,
    paced: bool,
    pool: &Pool,
    notices: &Notices,
) {
    // The connection of the last transaction, kept while its transactions commit: a checkout
    // tests the connection with a statement of its own (a round trip on PostgreSQL). After a
    // failure it goes back to the pool, which tests it before it is handed out again.
    let mut kept = None;
    let mut pace = Pace::default();
    loop {
        let most = if paced { pace.most() } else { MOST_PER_COMMIT };
        let Some(batch) = queue.take(first_writer, most) else {
            return;
        };
        let (writes, began) = (batch.len(), Instant::now());
        match kept.take().map_or_else(|| pool.get(), Ok) {
            Ok(mut conn) => {
                // A write's own panic is caught around it; this catches one in the
                // transaction's own handling, so the thread lives on. The batch's callers
                // see their answers dropped (a transient error), and the connection, left in
                // a transaction, is discarded by the pool.
                let transaction = || commit(&mut conn, batch, notices);
                match catch_unwind(AssertUnwindSafe(transaction)) {
                    Ok(ConnectionAfter::Fine) => {
                        pace.ran(writes, began.elapsed());
                        kept = Some(conn);
                    }
                    Ok(ConnectionAfter::InDoubt) => {}
                    Err(panic) => {
                        log::error!("the database writer panicked: {}", panic_message(&*panic))
                    }
                }
            }
            Err(e) => {
                let why = e.to_string();
                for write in batch {
                    write.fail(DbError::Batch(format!("no connection: {why}")));
                }
            }
        }
    }
}

/// Why a group commit's transaction ended without committing.
enum Broke {
    /// The first write failed; nothing else had run in the transaction.
    FirstWrite,
    /// The writes ran, and their events could not be recorded.
    Events(Refused),
    /// The transaction itself (or a savepoint) failed.
    Db(DbError),
}

impl From<diesel::result::Error> for Broke {
    fn from(e: diesel::result::Error) -> Self {
        Broke::Db(DbError::Query(e))
    }
}

/// What a batch's outcome says of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionAfter {
    /// The transaction committed: the connection works.
    Fine,
    /// Something failed, maybe the connection itself.
    InDoubt,
}

impl ConnectionAfter {
    /// From why the transaction did not commit, if it did not.
    fn of(why: Option<&str>) -> Self {
        match why {
            None => ConnectionAfter::Fine,
            Some(_) => ConnectionAfter::InDoubt,
        }
    }
}

/// The events of a transaction's writes, in the writes' order, recorded together just before
/// the commit: on PostgreSQL a statement per table for all of them, where recording them write
/// by write cost each write two round trips (its history rows, its outbox rows).
#[derive(Default)]
struct Caused {
    all: Vec<Envelope>,
    /// Per write that caused events: its answer's index, its recorder, its events in `all`.
    by_write: Vec<(usize, Recorder, std::ops::Range<usize>)>,
}

impl Caused {
    /// Takes the events of the writes that succeeded.
    fn take(answers: &mut [Box<dyn Answer>]) -> Self {
        let mut caused = Caused::default();
        for (i, answer) in answers.iter_mut().enumerate() {
            if let Some((recorder, events)) = answer.take_events() {
                let start = caused.all.len();
                caused.all.extend(events);
                caused.by_write.push((i, recorder, start..caused.all.len()));
            }
        }
        caused
    }

    /// Records them, each run of writes with one recorder at once; returns what runs after the
    /// commit.
    fn record(&self, conn: &mut DbConnection) -> Result<Vec<AfterCommit>, Refused> {
        let mut after = Vec::new();
        let mut writes = self.by_write.iter().peekable();
        while let Some((_, recorder, range)) = writes.next() {
            let mut end = range.end;
            while let Some((_, _, more)) = writes.next_if(|(_, next, _)| next.same_as(recorder)) {
                end = more.end;
            }
            after.extend(record_caught(recorder, conn, &self.all[range.start..end])?);
        }
        Ok(after)
    }

    /// After [`Caused::record`] failed with `e` and the transaction rolled back: the writes
    /// whose own events are refused, with why, so that each fails as if alone and the others
    /// are retried (a poison event must not fail its neighbours forever). A transient failure
    /// is no write's; a lone write's is its own; else each write's events are tried in a
    /// transaction of their own, rolled back whatever happens (the failure path only).
    fn refused(&self, conn: &mut DbConnection, e: Refused) -> Vec<(usize, Refused)> {
        if let [(i, _, _)] = self.by_write[..] {
            return vec![(i, e)];
        }
        if let Refused::Query(e) = e
            && DbError::Query(e).is_transient()
        {
            return Vec::new();
        }
        enum Tried {
            Recorded,
            Refused(Refused),
        }
        impl From<diesel::result::Error> for Tried {
            fn from(e: diesel::result::Error) -> Self {
                Tried::Refused(Refused::Query(e))
            }
        }
        let mut refused = Vec::new();
        for (i, recorder, range) in &self.by_write {
            let tried = write_transaction(conn, None, |conn| {
                record_caught(recorder, conn, &self.all[range.clone()]).map_err(Tried::Refused)?;
                Err::<(), _>(Tried::Recorded)
            });
            if let Err(Tried::Refused(e)) = tried {
                refused.push((*i, e));
            }
        }
        refused
    }
}

/// Runs `batch` in one transaction and answers every write once its fate is known. The first
/// write runs without a savepoint, as [`commit_alone`] does: nothing ran before it, so when it
/// fails the transaction's rollback is its own, and the others go on in a new transaction.
fn commit(
    conn: &mut DbConnection,
    batch: Vec<Box<dyn Write>>,
    notices: &Notices,
) -> ConnectionAfter {
    let mut pending = batch.into_iter();
    let Some(first) = pending.next() else {
        return ConnectionAfter::Fine;
    };
    if pending.len() == 0 {
        return commit_alone(conn, first, notices);
    }
    let mut first = Some(first);
    let mut answers: Vec<Box<dyn Answer>> = Vec::with_capacity(pending.len() + 1);
    let mut caused = Caused::default();
    let committed = write_transaction(conn, Some(notices), |conn| {
        if let Some(write) = first.take() {
            let (ran, succeeded) = write.run_alone(conn);
            answers.push(ran);
            if !succeeded {
                return Err(Broke::FirstWrite);
            }
        }
        let mut savepoint = Savepoint::default();
        for write in pending.by_ref() {
            match write.run(conn, &mut savepoint) {
                Ok(answer) => answers.push(answer),
                Err((answer, e)) => {
                    answers.push(answer);
                    return Err(Broke::Db(e));
                }
            }
        }
        caused = Caused::take(&mut answers);
        caused.record(conn).map_err(Broke::Events)
    });
    let why = match committed {
        Ok(after) => {
            after.into_iter().for_each(|after| after());
            None
        }
        Err(Broke::FirstWrite) => {
            for answer in answers {
                answer.answer(Outcome::RolledBack("the write failed"));
            }
            // The next transaction tells whether the connection still works.
            let rest: Vec<_> = pending.collect();
            return if rest.is_empty() {
                ConnectionAfter::InDoubt
            } else {
                commit(conn, rest, notices)
            };
        }
        Err(Broke::Events(e)) => {
            log::warn!(
                "a group commit of {} write(s) failed recording their events: {e}",
                answers.len()
            );
            let why = format!("another write's events could not be recorded: {e}");
            let mut refused: std::collections::HashMap<_, _> =
                caused.refused(conn, e).into_iter().collect();
            for (i, answer) in answers.into_iter().enumerate() {
                answer.answer(match refused.remove(&i) {
                    Some(e) => Outcome::EventsRefused(e),
                    None => Outcome::RolledBack(&why),
                });
            }
            return ConnectionAfter::InDoubt;
        }
        Err(Broke::Db(e)) => {
            log::warn!("a group commit of {} write(s) failed: {e}", answers.len());
            Some(e.to_string())
        }
    };
    for answer in answers {
        answer.answer(
            why.as_deref()
                .map_or(Outcome::Committed, Outcome::RolledBack),
        );
    }
    // Writes never run because the transaction broke before them.
    let connection = ConnectionAfter::of(why.as_deref());
    for write in first.into_iter().chain(pending) {
        write.fail(DbError::Batch(
            why.clone()
                .unwrap_or_else(|| "the transaction broke".to_owned()),
        ));
    }
    connection
}

/// Why a transaction of one write ended without committing.
enum BrokeAlone {
    /// The write failed (its answer says how).
    Write,
    /// The write ran, and its events could not be recorded.
    Events(Refused),
    /// The transaction itself failed.
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for BrokeAlone {
    fn from(e: diesel::result::Error) -> Self {
        BrokeAlone::Db(e)
    }
}

/// Runs a write that is alone in its transaction: its savepoint would only copy every page
/// it touches to a sub-journal (measured: ~15 % of orders' writer thread at 300 sagas/s), and
/// the transaction rolls back just as well.
fn commit_alone(
    conn: &mut DbConnection,
    write: Box<dyn Write>,
    notices: &Notices,
) -> ConnectionAfter {
    let mut waiting = Some(write);
    let mut answer: Option<Box<dyn Answer>> = None;
    let committed = write_transaction(conn, Some(notices), |conn| {
        let Some(write) = waiting.take() else {
            return Ok(Vec::new());
        };
        let (mut ran, succeeded) = write.run_alone(conn);
        let events = ran.take_events();
        answer = Some(ran);
        if !succeeded {
            return Err(BrokeAlone::Write);
        }
        match events {
            Some((recorder, events)) => record_caught(&recorder, conn, &events)
                .map(|after| after.into_iter().collect())
                .map_err(BrokeAlone::Events),
            None => Ok(Vec::new()),
        }
    });
    let mut refused = None;
    let why = match committed {
        Ok(after) => {
            after.into_iter().for_each(|after: AfterCommit| after());
            None
        }
        Err(BrokeAlone::Write) => Some("the write failed".to_owned()),
        Err(BrokeAlone::Events(e)) => {
            let why = format!("its events could not be recorded: {e}");
            refused = Some(e);
            Some(why)
        }
        Err(BrokeAlone::Db(e)) => {
            log::warn!("a write failed to commit: {e}");
            Some(e.to_string())
        }
    };
    let connection = ConnectionAfter::of(why.as_deref());
    if let Some(answer) = answer {
        answer.answer(match (refused, &why) {
            (Some(e), _) => Outcome::EventsRefused(e),
            (None, Some(why)) => Outcome::RolledBack(why),
            (None, None) => Outcome::Committed,
        });
    }
    // Never run: the transaction could not begin.
    if let Some(write) = waiting {
        let why = why.unwrap_or_else(|| "the transaction did not begin".to_owned());
        write.fail(DbError::Batch(why));
    }
    connection
}

#[cfg(test)]
mod tests {
    use crate::db::{Database, DbConnection, DbError, PLUMBING_MIGRATIONS};
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::mpsc;
    use std::task::{Context, Waker};

    fn insert(conn: &mut DbConnection, id: &str) -> Result<(), DbError> {
        conn.batch_execute(&format!(
            "INSERT INTO processed_events VALUES ('{id}', 'T', 'now')"
        ))
        .map_err(DbError::from)
    }

    fn ids(conn: &mut DbConnection) -> Result<Vec<String>, DbError> {
        crate::inbox::processed_events::table
            .select(crate::inbox::processed_events::event_id)
            .order(crate::inbox::processed_events::event_id)
            .load(conn)
            .map_err(DbError::from)
    }

    fn open(dir: &tempfile::TempDir) -> Database {
        Database::open(
            dir.path().join("g.db").to_str().unwrap(),
            PLUMBING_MIGRATIONS,
        )
        .unwrap()
    }

    /// Runs `work` through [`Database::write`] on a task of its own.
    fn spawn_write<T: Send + 'static>(
        db: &Database,
        work: impl FnOnce(&mut DbConnection) -> Result<(T, Vec<events::Envelope>), DbError>
        + Send
        + 'static,
    ) -> tokio::task::JoinHandle<Result<T, DbError>> {
        let db = db.clone();
        tokio::spawn(async move { db.write(work).await })
    }

    /// Polls a write once: [`Database::write`] queues it on its first poll, so writes queued
    /// this way reach the writer in this order, with no sleep to order them.
    fn queued<T>(
        db: &Database,
        work: impl FnOnce(&mut DbConnection) -> Result<(T, Vec<events::Envelope>), DbError>
        + Send
        + 'static,
    ) -> Pin<Box<dyn Future<Output = Result<T, DbError>> + Send>>
    where
        T: Send + 'static,
    {
        let db = db.clone();
        let mut write: Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(async move { db.write(work).await });
        assert!(unanswered(&mut write), "answered before it was run");
        write
    }

    /// True while `write` has no answer (polled without waiting).
    fn unanswered<T>(write: &mut Pin<Box<dyn Future<Output = T> + Send>>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        write.as_mut().poll(&mut cx).is_pending()
    }

    /// A write that does nothing; the queue's tests only move it around.
    struct Idle;

    impl super::Write for Idle {
        fn run(
            self: Box<Self>,
            _: &mut DbConnection,
            _: &mut super::Savepoint,
        ) -> Result<Box<dyn super::Answer>, (Box<dyn super::Answer>, DbError)> {
            unreachable!("the queue's tests run no write")
        }
        fn run_alone(self: Box<Self>, _: &mut DbConnection) -> (Box<dyn super::Answer>, bool) {
            unreachable!("the queue's tests run no write")
        }
        fn fail(self: Box<Self>, _: DbError) {}
    }

    fn queue() -> std::sync::Arc<super::Queue> {
        std::sync::Arc::new(super::Queue::new())
    }

    /// The first writer takes every write waiting (up to a transaction's worth) as soon as it
    /// asks; another writer takes a write only once it has waited `SPILL_AFTER` for the first.
    #[test]
    fn other_writers_take_only_what_the_first_left_waiting() {
        let q = queue();
        for _ in 0..super::MOST_PER_COMMIT + 6 {
            q.push(Box::new(Idle)).unwrap();
        }
        assert_eq!(
            q.take(true, super::MOST_PER_COMMIT).unwrap().len(),
            super::MOST_PER_COMMIT
        );
        assert_eq!(q.take(true, super::MOST_PER_COMMIT).unwrap().len(), 6);

        let spilled = {
            let q = q.clone();
            std::thread::spawn(move || q.take(false, 1).map(|batch| batch.len()))
        };
        let pushed = std::time::Instant::now();
        q.push(Box::new(Idle)).unwrap();
        assert_eq!(spilled.join().unwrap(), Some(1));
        assert!(
            pushed.elapsed() >= super::SPILL_AFTER,
            "another writer took a write the first could still take"
        );
    }

    /// A writer whose writes take long takes few at a time (the others go to another writer);
    /// one whose writes take a fraction of a millisecond takes a full transaction's worth.
    #[test]
    fn a_writer_takes_as_many_writes_as_fit_its_budget() {
        use super::{MOST_PER_COMMIT, Pace};
        use std::time::Duration;
        let mut pace = Pace::default();
        assert_eq!(pace.most(), MOST_PER_COMMIT, "nothing known yet");
        pace.ran(40, Duration::from_millis(8));
        assert_eq!(pace.most(), MOST_PER_COMMIT, "0.2 ms a write");
        let mut distant = Pace::default();
        distant.ran(4, Duration::from_millis(80));
        assert_eq!(distant.most(), 5, "20 ms a write");
        distant.ran(1, Duration::from_millis(2_000));
        assert_eq!(distant.most(), 1, "one at a time at worst");
        let q = queue();
        for _ in 0..5 {
            q.push(Box::new(Idle)).unwrap();
        }
        assert_eq!(q.take(true, distant.most()).unwrap().len(), 1);
        assert_eq!(q.take(true, 3).unwrap().len(), 3);
    }

    /// A closed queue refuses new writes; its writers take what still waits, then stop.
    #[test]
    fn a_closed_queue_is_drained_then_ends() {
        let q = queue();
        q.push(Box::new(Idle)).unwrap();
        q.close();
        assert!(q.push(Box::new(Idle)).is_err(), "accepted after closing");
        assert_eq!(q.take(false, 4).map(|batch| batch.len()), Some(1));
        assert!(q.take(true, 4).is_none() && q.take(false, 4).is_none());
    }

    /// Writes queued behind a busy writer run in one transaction, each in its own savepoint:
    /// while the last of them runs, the earlier ones have run but nothing of them is
    /// committed (another connection does not see them) nor answered — they share its
    /// transaction. One that fails after changing something and one that panics roll back
    /// alone; the others commit, and each caller gets its own answer.
    #[tokio::test]
    async fn writes_queued_together_share_one_transaction_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        // The first write holds the writer until the others are queued behind it.
        let (started, first_runs) = tokio::sync::oneshot::channel();
        let (release, hold) = mpsc::channel::<()>();
        let first = spawn_write(&db, move |conn| {
            let _ = started.send(());
            let _ = hold.recv();
            insert(conn, "a")?;
            Ok(((), Vec::new()))
        });
        first_runs.await.unwrap();
        let ok = |id: &'static str| {
            queued(&db, move |conn| {
                insert(conn, id)?;
                Ok((ids(conn)?, Vec::new()))
            })
        };
        let mut b = ok("b");
        let failing = queued(&db, |conn| {
            insert(conn, "c")?;
            Err::<((), _), _>(DbError::Task("refused".into()))
        });
        let panicking = queued(&db, |conn| {
            insert(conn, "d")?;
            if conn.batch_execute("SELECT 1").is_ok() {
                panic!("a bug in a handler");
            }
            Ok(((), Vec::new()))
        });
        // The last write holds its transaction open until told.
        let (running, e_runs) = tokio::sync::oneshot::channel();
        let (finish, e_holds) = mpsc::channel::<()>();
        let e = queued(&db, move |conn| {
            insert(conn, "e")?;
            let seen = ids(conn)?;
            let _ = running.send(());
            let _ = e_holds.recv();
            Ok((seen, Vec::new()))
        });
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        e_runs.await.unwrap();
        // b ran before e (e saw it), yet it is neither committed nor answered: it waits for
        // e's commit, which is its own.
        assert_eq!(db.read(ids).await.unwrap(), ["a"], "b committed alone");
        assert!(unanswered(&mut b), "b was answered before its commit");
        finish.send(()).unwrap();

        // b sees only what committed before it and itself.
        assert_eq!(b.await.unwrap(), ["a", "b"]);
        assert!(matches!(failing.await, Err(DbError::Task(m)) if m == "refused"));
        let panicked = panicking.await.unwrap_err();
        assert!(
            matches!(&panicked, DbError::Task(m) if m.contains("a bug in a handler")),
            "{panicked}"
        );
        // e sees b, and not the rolled-back c and d.
        assert_eq!(e.await.unwrap(), ["a", "b", "e"]);
        let kept = db.read(ids).await.unwrap();
        assert_eq!(kept, ["a", "b", "e"]);
        // The writer thread survived the panic.
        db.write(|conn| Ok::<_, DbError>((insert(conn, "f")?, Vec::new())))
            .await
            .unwrap();
    }

    /// The first write of a group runs without a savepoint: when it fails (or panics) after
    /// changing something, nothing of it is kept, its caller gets its own error, and the writes
    /// queued behind it still commit (in the next transaction).
    #[tokio::test]
    async fn the_first_write_of_a_group_fails_alone_and_the_others_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        for fault in ["refused", "panicked"] {
            let (started, first_runs) = tokio::sync::oneshot::channel();
            let (release, hold) = mpsc::channel::<()>();
            let holder = spawn_write(&db, move |_| {
                let _ = started.send(());
                let _ = hold.recv();
                Ok(((), Vec::new()))
            });
            first_runs.await.unwrap();
            let failing = queued(&db, move |conn| {
                insert(conn, &format!("{fault}-x"))?;
                if fault == "panicked" && conn.batch_execute("SELECT 1").is_ok() {
                    panic!("a bug in a handler");
                }
                Err::<((), _), _>(DbError::Task("refused".into()))
            });
            let ok = |id: String| {
                queued(&db, move |conn| {
                    insert(conn, &id)?;
                    Ok(((), Vec::new()))
                })
            };
            let (y, z) = (ok(format!("{fault}-y")), ok(format!("{fault}-z")));
            release.send(()).unwrap();
            holder.await.unwrap().unwrap();
            let failed = failing.await.unwrap_err();
            assert!(
                matches!(&failed, DbError::Task(m) if m.contains("refused") || m.contains("a bug")),
                "{failed}"
            );
            y.await.unwrap();
            z.await.unwrap();
        }
        assert_eq!(
            db.read(ids).await.unwrap(),
            ["panicked-y", "panicked-z", "refused-y", "refused-z"]
        );
    }

    /// The writer keeps its connection from one transaction to the next (a checkout costs a
    /// test statement): a temporary table, which only the connection that made it sees, is
    /// there for the next write even while a read holds another connection of the pool — the
    /// one the writer would have been handed back first had it returned its own.
    #[tokio::test]
    async fn the_writer_keeps_its_connection_between_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        db.write(|conn| {
            conn.batch_execute("CREATE TEMP TABLE writer_mark (x)")?;
            Ok::<_, DbError>(((), Vec::new()))
        })
        .await
        .unwrap();
        let (holding, held) = tokio::sync::oneshot::channel();
        let (release, hold) = mpsc::channel::<()>();
        let reader = db.clone();
        let reading = tokio::spawn(async move {
            reader
                .read(move |_| {
                    let _ = holding.send(());
                    let _ = hold.recv();
                    Ok::<_, DbError>(())
                })
                .await
        });
        held.await.unwrap();
        let marked = db
            .write(|conn| {
                conn.batch_execute("INSERT INTO writer_mark VALUES (1)")?;
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await;
        release.send(()).unwrap();
        reading.await.unwrap().unwrap();
        assert!(
            marked.is_ok(),
            "the second write ran on another connection: {marked:?}"
        );
    }

    /// A write alone in its transaction (no savepoint) fails or panics just as alone: its own
    /// error, nothing of it kept, the writer alive.
    #[tokio::test]
    async fn a_write_alone_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let failed = db
            .write(|conn| {
                insert(conn, "a")?;
                Err::<((), Vec<events::Envelope>), _>(DbError::Task("refused".into()))
            })
            .await;
        assert!(matches!(failed, Err(DbError::Task(m)) if m == "refused"));
        let panicked = db
            .write(|conn| {
                insert(conn, "b")?;
                if conn.batch_execute("SELECT 1").is_ok() {
                    panic!("a bug in a handler");
                }
                Ok(((), Vec::new()))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&panicked, DbError::Task(m) if m.contains("a bug in a handler")),
            "{panicked}"
        );
        let kept = db
            .write(|conn| {
                insert(conn, "c")?;
                Ok::<_, DbError>((ids(conn)?, Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(kept, ["c"]);
        assert_eq!(db.read(ids).await.unwrap(), ["c"]);
    }

    /// The order ids of each call of the hook; the events of order 666 it cannot record (a
    /// real constraint violation, as a NUL that slipped past the edges would be on PostgreSQL),
    /// and on those of order 999 it panics (a bug).
    struct Seen(std::sync::Arc<std::sync::Mutex<Vec<Vec<i64>>>>);

    impl crate::db::WriteHook for Seen {
        fn writing(
            &self,
            conn: &mut DbConnection,
            events: &[events::Envelope],
        ) -> diesel::QueryResult<Option<crate::db::AfterCommit>> {
            let orders: Vec<i64> = events.iter().filter_map(|e| e.event.order_id()).collect();
            assert!(!orders.contains(&999), "a bug in a hook");
            if orders.contains(&666) {
                conn.batch_execute(
                    "INSERT INTO processed_events VALUES ('twice', 'T', 'now'); \
                     INSERT INTO processed_events VALUES ('twice', 'T', 'now')",
                )?;
            }
            self.0.lock().unwrap().push(orders);
            Ok(None)
        }
    }

    fn completed(order_id: i64) -> events::Envelope {
        use events::{Event, OrderCompleted, Service};
        let e = OrderCompleted {
            order_id,
            product_id: 1,
            quantity: 1,
            customer_id: "c".into(),
        };
        events::Envelope::new(Service::Orders, Event::OrderCompleted(e))
    }

    /// The outbox's pending rows, as their keys in commit order.
    fn outbox_keys(conn: &mut DbConnection) -> Result<Vec<String>, DbError> {
        Ok(crate::outbox::pending(conn, 100)?
            .into_iter()
            .map(|row| row.message_key)
            .collect())
    }

    /// Holds the writer with a write of its own until the returned sender is used, so the
    /// writes queued meanwhile share the next transaction.
    async fn hold_writer(
        db: &Database,
    ) -> (
        mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), DbError>>,
    ) {
        let (started, runs) = tokio::sync::oneshot::channel();
        let (release, hold) = mpsc::channel::<()>();
        let holder = spawn_write(db, move |_| {
            let _ = started.send(());
            let _ = hold.recv();
            Ok(((), Vec::new()))
        });
        runs.await.unwrap();
        (release, holder)
    }

    /// The events of the writes of one transaction are recorded together, once, in the writes'
    /// order (the hook sees them in one call; the outbox numbers them in that order), and
    /// commit with them.
    #[tokio::test]
    async fn the_events_of_writes_queued_together_are_recorded_at_once_in_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let calls = std::sync::Arc::default();
        let db =
            open(&dir).with_write_hook(std::sync::Arc::new(Seen(std::sync::Arc::clone(&calls))));
        let (release, holder) = hold_writer(&db).await;
        let causing = |orders: Vec<i64>| {
            queued(&db, move |conn| {
                insert(conn, &format!("w{}", orders.first().unwrap_or(&0)))?;
                Ok(((), orders.into_iter().map(completed).collect()))
            })
        };
        let writes = [causing(vec![1]), causing(Vec::new()), causing(vec![2, 3])];
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        for write in writes {
            write.await.unwrap();
        }
        assert_eq!(*calls.lock().unwrap(), [vec![1, 2, 3]]);
        assert_eq!(db.read(outbox_keys).await.unwrap(), ["1", "2", "3"]);
        assert_eq!(db.read(ids).await.unwrap(), ["w0", "w1", "w2"]);
    }

    /// When the events of one write of a transaction cannot be recorded, nothing of the
    /// transaction commits; that write gets its own error (not transient: a consumer parks
    /// its event; a panic of the hook as the write's own panic), the others a transient one,
    /// and retried they commit.
    #[tokio::test]
    async fn a_write_whose_events_cannot_be_recorded_fails_alone_and_the_others_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir).with_write_hook(std::sync::Arc::new(Seen(Default::default())));
        let work = |order: i64| {
            move |conn: &mut DbConnection| {
                insert(conn, &format!("w{order}"))?;
                Ok(((), vec![completed(order)]))
            }
        };
        let (first, poison, panicking, last) = (
            || queued(&db, work(1)),
            || queued(&db, work(666)),
            || queued(&db, work(999)),
            || queued(&db, work(2)),
        );
        let (release, holder) = hold_writer(&db).await;
        let writes = [first(), poison(), panicking(), last()];
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let [first_failed, poison_failed, panicked, last_failed] =
            futures_util::future::join_all(writes)
                .await
                .try_into()
                .unwrap();
        let poison_failed = poison_failed.unwrap_err();
        assert!(!poison_failed.is_transient(), "{poison_failed}");
        let panicked = panicked.unwrap_err();
        assert!(
            matches!(&panicked, DbError::Task(m) if m.contains("a bug in a hook")),
            "{panicked}"
        );
        for neighbour in [first_failed, last_failed] {
            let e = neighbour.unwrap_err();
            assert!(matches!(e, DbError::Batch(_)) && e.is_transient(), "{e}");
        }
        assert!(db.read(ids).await.unwrap().is_empty(), "a write committed");
        assert!(db.read(outbox_keys).await.unwrap().is_empty());
        // Retried, each alone or together, the neighbours commit; the poison fails alike.
        let (release, holder) = hold_writer(&db).await;
        let writes = [first(), last()];
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        for write in writes {
            write.await.unwrap();
        }
        assert!(!db.write(work(666)).await.unwrap_err().is_transient());
        let alone = db.write(work(999)).await.unwrap_err();
        assert!(
            matches!(&alone, DbError::Task(m) if m.contains("a bug in a hook")),
            "{alone}"
        );
        assert_eq!(db.read(outbox_keys).await.unwrap(), ["1", "2"]);
        assert_eq!(db.read(ids).await.unwrap(), ["w1", "w2"]);
    }
}
