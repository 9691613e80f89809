//! The live dashboard, served by orders: the page (`/` and its script and style, embedded in
//! the binary: no build step, nothing fetched from elsewhere), `GET /dashboard/config` (where
//! the page finds products and delivery, and the newest order id its list starts from) and
//! `GET /events/stream`, every row of `order_events` as a server-sent event as soon as it
//! commits.
//!
//! The stream has one shared [`EventTail`]: it waits on [`Database::commits`], reads the rows
//! after the last one it saw and broadcasts them, as pre-rendered SSE frames, to every open
//! stream. A stream first subscribes, then catches up from the database after the seq the
//! client asked for, then follows the broadcast, skipping what it already sent. Each broadcast
//! batch says which rows it covers (`after < seq ≤ last`), so a stream that is behind the batch
//! (it lagged and the broadcast dropped batches, or the tail was idle while nobody listened)
//! catches up from the database from its own last seq: no row is lost or sent twice, and a slow
//! client holds at most a few frames in memory. No timers besides the 15 s keep-alive comment.
//!
//! Catching up is bounded, so a client cannot make orders read its whole history for it: a
//! stream replays at most the newest `EVENT_STREAM_REPLAY_WINDOW` rows (1,000 by default).
//! One that asks for older ones (`Last-Event-ID: 0`) first gets a `skipped` event whose id is
//! where it resumes and whose data says which seqs it will not see (`{"after": 0,
//! "resumeAfter": 8123, "window": 1000}`; the timelines, `GET /orders/{id}/events`, still have
//! them). And the streams' reads of the database take turns on [`CATCH_UP_READS`] permits, so
//! however many streams catch up at once they hold at most that many of the pool's
//! connections: the relay, the consumer, `/health` and the API keep the rest.

use crate::error::OrdersError;
use crate::store::schema::order_events;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header::{self, HeaderMap};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use diesel::prelude::*;
use kafka::db::DbConnection;
use kafka::{ConfigError, Database, DbError};
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");

/// Rows read from the database at a time (catch-up and tail).
const PAGE: i64 = 500;
/// Batches the broadcast keeps for a stream that is behind; past that it lags and catches up
/// from the database.
const BROADCAST_CAPACITY: usize = 64;
/// Frames queued per open stream before it stops reading the broadcast.
const STREAM_BUFFER: usize = 16;
/// Event streams open at once; one more is refused with 503 until one ends. Each holds a task
/// and a connection, and catching up reads the database the saga writes.
pub const MAX_STREAMS: usize = 64;

/// The open event streams, bounded by a maximum.
#[derive(Clone)]
struct StreamSlots {
    open: Arc<AtomicU64>,
    max: u64,
}

/// One open stream's place; given back when dropped (the stream ended).
struct StreamSlot(Arc<AtomicU64>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamSlots {
    fn new(max: usize) -> Self {
        StreamSlots {
            open: Arc::new(AtomicU64::new(0)),
            max: max as u64,
        }
    }

    /// A place for one more stream, unless `max` are open.
    fn take(&self) -> Option<StreamSlot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = StreamSlot(self.open.clone());
        (before < self.max).then_some(slot)
    }
}

/// Database reads on behalf of streams at once (catch-ups, resyncs, finding the end or the
/// window's start); the others wait their turn, off the pool. One of the pool's seven read
/// connections at most; the shared tail reads on its own.
pub const CATCH_UP_READS: usize = 1;
/// `EVENT_STREAM_REPLAY_WINDOW` when unset: the most rows one catch-up replays.
pub const REPLAY_WINDOW_DEFAULT: i64 = 1000;

/// Reads `EVENT_STREAM_REPLAY_WINDOW` (rows, at least 1).
pub fn replay_window_from_env() -> Result<i64, ConfigError> {
    const NAME: &str = "EVENT_STREAM_REPLAY_WINDOW";
    match kafka::env_or(NAME, REPLAY_WINDOW_DEFAULT)? {
        rows if rows >= 1 => Ok(rows),
        rows => Err(ConfigError {
            name: NAME.to_owned(),
            value: rows.to_string(),
            reason: "must be at least 1 (rows a stream may replay)".into(),
        }),
    }
}

/// How often an idle stream sends a comment, so proxies and the browser keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Where the page finds products and delivery: `PRODUCTS_URL` and `DELIVERY_URL`, or, unset,
/// the host the page was loaded from with ports 8085 and 8082.
#[derive(Debug, Clone, Default)]
pub struct Links {
    products: Option<String>,
    delivery: Option<String>,
}

impl Links {
    /// Reads `PRODUCTS_URL` and `DELIVERY_URL`; a value that is not an http(s) URL is an error
    /// naming the variable.
    pub fn from_env() -> Result<Links, ConfigError> {
        let read = |name: &str| parse_link(name, std::env::var(name).ok());
        Ok(Links {
            products: read("PRODUCTS_URL")?,
            delivery: read("DELIVERY_URL")?,
        })
    }
}

fn parse_link(name: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let url = value.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(Some(url.to_owned()))
        }
        _ => Err(ConfigError {
            name: name.to_owned(),
            reason: "expected an http:// or https:// base URL, like http://127.0.0.1:8085".into(),
            value,
        }),
    }
}

/// The dashboard's shared state: the links and the event tail.
#[derive(Clone)]
pub struct Dashboard {
    links: Links,
    tail: EventTail,
    streams: StreamSlots,
}

impl Dashboard {
    /// The dashboard over orders' database; a stream replays at most `replay_window` rows.
    pub fn new(db: Database, links: Links, replay_window: i64) -> Self {
        Dashboard {
            links,
            tail: EventTail::new(db, BROADCAST_CAPACITY, replay_window),
            streams: StreamSlots::new(MAX_STREAMS),
        }
    }

    /// Registers `/`, the page's assets, `/dashboard/config` and `/events/stream`.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let get = |path: &str, to| {
            web::resource(path)
                .route(to)
                .default_service(web::to(kafka::http::method_not_allowed))
        };
        cfg.app_data(web::Data::new(self.links.clone()))
            .app_data(web::Data::new(self.tail.clone()))
            .app_data(web::Data::new(self.streams.clone()))
            .service(get("/", web::get().to(index)))
            .service(get("/dashboard/app.js", web::get().to(app_js)))
            .service(get("/dashboard/style.css", web::get().to(style_css)))
            .service(get("/dashboard/config", web::get().to(config)))
            .service(get("/events/stream", web::get().to(stream)));
    }

    /// Runs the shared tail until `stop`; then every open stream ends.
    pub async fn run(self, stop: CancellationToken) {
        self.tail.run(stop).await
    }
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `GET /dashboard/config`: `{productsUrl, deliveryUrl, newestOrderId}`; the newest order id
/// (0 when there is none) is where the page's window of the newest orders starts, since
/// `GET /orders` pages upwards from an id.
async fn config(
    req: HttpRequest,
    links: web::Data<Links>,
    db: web::Data<Database>,
) -> Result<HttpResponse, OrdersError> {
    let newest = db.read(newest_order_id).await?;
    let info = req.connection_info();
    let default = |port: u16| format!("{}://{}:{port}", info.scheme(), hostname(info.host()));
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "productsUrl": links.products.clone().unwrap_or_else(|| default(8085)),
        "deliveryUrl": links.delivery.clone().unwrap_or_else(|| default(8082)),
        "newestOrderId": newest,
    })))
}

fn newest_order_id(conn: &mut DbConnection) -> Result<i64, DbError> {
    use crate::store::schema::orders;
    Ok(orders::table
        .select(diesel::dsl::max(orders::id))
        .first::<Option<i64>>(conn)?
        .unwrap_or_default())
}

/// `host[:port]` without the port (`[::1]:8081` → `[::1]`).
fn hostname(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    after: Option<i64>,
    /// The page's bearer token (EventSource sends no headers): `kafka::auth` reads it.
    #[serde(rename = "access_token")]
    _access_token: Option<String>,
}

/// Where a stream starts: after `Last-Event-ID` (what a reconnecting browser sends), else after
/// `?after=`, else at the current end. Errors name what is wrong.
fn start_point(headers: &HeaderMap, after: Option<i64>) -> Result<Option<i64>, String> {
    if let Some(value) = headers.get("Last-Event-ID") {
        let text = value.to_str().unwrap_or_default().trim();
        return match text.parse::<i64>() {
            Ok(seq) if seq >= 0 => Ok(Some(seq)),
            _ => Err(format!(
                "Last-Event-ID must be an event seq (0 or more), got {value:?}"
            )),
        };
    }
    match after {
        Some(seq) if seq < 0 => Err(format!("after must be a seq (0 or more), got {seq}")),
        other => Ok(other),
    }
}

/// `GET /events/stream[?after=<seq>]`: `text/event-stream`, first a `hello` event whose id is
/// where the stream starts, then one `message` per `order_events` row after it, its id the seq.
async fn stream(
    req: HttpRequest,
    tail: web::Data<EventTail>,
    query: web::Query<StreamQuery>,
    slots: web::Data<StreamSlots>,
) -> Result<HttpResponse, OrdersError> {
    let start = start_point(req.headers(), query.after).map_err(OrdersError::Invalid)?;
    let Some(slot) = slots.take() else {
        return Ok(kafka::http::too_busy(format!(
            "too busy: {MAX_STREAMS} event streams are open; retry in a second"
        )));
    };
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    let tail = tail.get_ref().clone();
    tokio::spawn(async move {
        // Held until the stream ends: the client went away, or the service stops.
        let _slot = slot;
        match tail.follow(start, sender).await {
            Ok(()) | Err(StreamEnd::Disconnected) => {}
            Err(e) => log::warn!("/events/stream ended: {e}"),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .body(SseBody(receiver)))
}

/// The response body: whatever the stream's task sends, until it stops.
struct SseBody(mpsc::Receiver<Bytes>);

impl MessageBody for SseBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(Ok))
    }
}

/// One `order_events` row, rendered once as its SSE frame.
#[derive(Debug, Clone)]
struct Frame {
    seq: i64,
    text: Bytes,
}

/// Every row with `after < seq ≤` the last frame's seq; no frames: the end is at `after`.
#[derive(Debug)]
struct Batch {
    after: i64,
    frames: Vec<Frame>,
}

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = order_events)]
struct EventRow {
    seq: i64,
    order_id: i64,
    event_id: String,
    event_type: String,
    source: String,
    causation_id: Option<String>,
    initiator: Option<String>,
    timestamp: String,
    payload: String,
}

/// One event as the stream sends it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StreamEvent {
    seq: i64,
    order_id: i64,
    event_type: String,
    source: String,
    event_id: String,
    causation_id: Option<String>,
    initiator: Option<String>,
    timestamp: String,
    payload: serde_json::Value,
}

impl EventRow {
    fn frame(self) -> Frame {
        let seq = self.seq;
        let event = StreamEvent {
            payload: serde_json::from_str(&self.payload)
                .unwrap_or(serde_json::Value::String(self.payload)),
            seq,
            order_id: self.order_id,
            event_type: self.event_type,
            source: self.source,
            event_id: self.event_id,
            causation_id: self.causation_id,
            initiator: self.initiator,
            timestamp: self.timestamp,
        };
        // Serialised JSON has no raw newline, so one `data:` line holds it.
        let data = serde_json::to_string(&event).unwrap_or_else(|_| "{}".into());
        Frame {
            seq,
            text: Bytes::from(format!("id: {seq}\ndata: {data}\n\n")),
        }
    }
}

fn rows_after(conn: &mut DbConnection, after: i64) -> Result<Vec<Frame>, DbError> {
    Ok(order_events::table
        .filter(order_events::seq.gt(after))
        .order(order_events::seq)
        .limit(PAGE)
        .select(EventRow::as_select())
        .load(conn)?
        .into_iter()
        .map(EventRow::frame)
        .collect())
}

/// The seq after which the newest `window` rows start; `None` when there are no more rows
/// than that. Walks `window` entries of the primary key, whatever the history's length.
fn window_start(conn: &mut DbConnection, window: i64) -> Result<Option<i64>, DbError> {
    Ok(order_events::table
        .select(order_events::seq)
        .order(order_events::seq.desc())
        .offset(window)
        .first::<i64>(conn)
        .optional()?)
}

fn last_seq(conn: &mut DbConnection) -> Result<i64, DbError> {
    Ok(order_events::table
        .select(diesel::dsl::max(order_events::seq))
        .first::<Option<i64>>(conn)?
        .unwrap_or_default())
}

/// The client went away, or the tail stopped.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("the client disconnected")]
    Disconnected,
    #[error(transparent)]
    Database(#[from] DbError),
}

/// The one reader of new `order_events` rows, broadcasting them to every open stream.
#[derive(Clone)]
pub struct EventTail {
    db: Database,
    batches: broadcast::Sender<Arc<Batch>>,
    stopped: CancellationToken,
    /// Times a stream fell behind the broadcast and caught up from the database.
    resyncs: Arc<AtomicU64>,
    /// The most rows one catch-up replays.
    window: i64,
    /// Turns for the streams' own reads ([`CATCH_UP_READS`]).
    reads: Arc<Semaphore>,
}

impl EventTail {
    fn new(db: Database, capacity: usize, window: i64) -> Self {
        EventTail {
            db,
            batches: broadcast::Sender::new(capacity),
            stopped: CancellationToken::new(),
            resyncs: Arc::new(AtomicU64::new(0)),
            window,
            reads: Arc::new(Semaphore::new(CATCH_UP_READS)),
        }
    }

    /// A read made for one stream, when its turn comes ([`CATCH_UP_READS`]).
    async fn stream_read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
        T: Send + 'static,
    {
        let _turn = self
            .reads
            .acquire()
            .await
            .map_err(|e| DbError::Task(e.to_string()))?;
        self.db.read(f).await
    }

    /// After every committed write, reads the rows after the last one seen and broadcasts
    /// them. While no stream is open it reads nothing; the first batch after that is an empty
    /// one marking the current end, so a stream that opened meanwhile knows to catch up.
    async fn run(self, stop: CancellationToken) {
        let mut commits = self.db.commits();
        let mut last: Option<i64> = None;
        loop {
            if self.batches.receiver_count() == 0 {
                last = None;
            } else if let Err(e) = self.publish(&mut last).await {
                log::warn!("dashboard event tail: {e}; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = commits.changed() => if changed.is_err() { break },
            }
        }
        self.stopped.cancel();
    }

    /// Broadcasts every row after `last` (an empty marker batch when `last` is unknown).
    async fn publish(&self, last: &mut Option<i64>) -> Result<(), DbError> {
        let mut after = match *last {
            Some(seq) => seq,
            None => {
                let end = self.db.read(last_seq).await?;
                let _ = self.batches.send(Arc::new(Batch {
                    after: end,
                    frames: Vec::new(),
                }));
                *last = Some(end);
                end
            }
        };
        loop {
            let frames = self.db.read(move |conn| rows_after(conn, after)).await?;
            let Some(end) = frames.last().map(|f| f.seq) else {
                return Ok(());
            };
            let full = frames.len() as i64 == PAGE;
            let _ = self.batches.send(Arc::new(Batch { after, frames }));
            after = end;
            *last = Some(end);
            if !full {
                return Ok(());
            }
        }
    }

    /// Feeds one stream into `out` from `start` (`None`: the current end) until the client goes
    /// away or the tail stops.
    async fn follow(&self, start: Option<i64>, out: mpsc::Sender<Bytes>) -> Result<(), StreamEnd> {
        // Subscribe first: whatever commits from now on is in the catch-up or a batch.
        let mut batches = self.batches.subscribe();
        let mut last = match start {
            Some(seq) => seq,
            None => self.stream_read(last_seq).await?,
        };
        let hello = format!("retry: 2000\nid: {last}\nevent: hello\ndata: {{\"seq\":{last}}}\n\n");
        send(&out, Bytes::from(hello)).await?;
        self.catch_up(&mut last, &out).await?;
        let mut keep_alive =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        loop {
            tokio::select! {
                _ = self.stopped.cancelled() => return Ok(()),
                _ = out.closed() => return Err(StreamEnd::Disconnected),
                _ = keep_alive.tick() => send(&out, Bytes::from_static(b": keep-alive\n\n")).await?,
                batch = batches.recv() => match batch {
                    Ok(batch) => {
                        if batch.after > last {
                            self.resync(&mut last, &out).await?;
                        }
                        for frame in &batch.frames {
                            if frame.seq > last {
                                send(&out, frame.text.clone()).await?;
                                last = frame.seq;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.resync(&mut last, &out).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }

    /// The stream missed batches: it catches up from the database from its last seq.
    async fn resync(&self, last: &mut i64, out: &mpsc::Sender<Bytes>) -> Result<(), StreamEnd> {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        self.catch_up(last, out).await
    }

    /// Sends every row after `last` from the database, page by page; at most the newest
    /// `window` of them, after a `skipped` event when there are more.
    async fn catch_up(&self, last: &mut i64, out: &mpsc::Sender<Bytes>) -> Result<(), StreamEnd> {
        let window = self.window;
        if let Some(start) = self
            .stream_read(move |conn| window_start(conn, window))
            .await?
            .filter(|start| *start > *last)
        {
            let skipped = format!(
                "id: {start}\nevent: skipped\ndata: {{\"after\":{last},\"resumeAfter\":{start},\"window\":{window}}}\n\n",
                last = *last
            );
            send(out, Bytes::from(skipped)).await?;
            *last = start;
        }
        loop {
            let after = *last;
            let frames = self
                .stream_read(move |conn| rows_after(conn, after))
                .await?;
            let full = frames.len() as i64 == PAGE;
            for frame in frames {
                send(out, frame.text).await?;
                *last = frame.seq;
            }
            if !full {
                return Ok(());
            }
        }
    }
}

async fn send(out: &mpsc::Sender<Bytes>, chunk: Bytes) -> Result<(), StreamEnd> {
    out.send(chunk).await.map_err(|_| StreamEnd::Disconnected)
}

#[cfg(test)]
mod tests {

    #[test]
    fn streams_beyond_the_maximum_are_refused_until_one_ends() {
        let slots = StreamSlots::new(2);
        let (first, second) = (slots.take(), slots.take());
        assert!(first.is_some() && second.is_some());
        assert!(slots.take().is_none(), "a third stream");
        drop(first);
        assert!(slots.take().is_some(), "a place came free");
    }

    use super::*;

    const MIGRATIONS: kafka::db::Migrations = crate::startup::MIGRATIONS;

    async fn database() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Database::open(dir.path().join("orders.db").to_str().unwrap(), MIGRATIONS).unwrap();
        (dir, db)
    }

    /// Commits one history row for order `order` through `Database::write`, as the consumer
    /// does; returns its seq.
    async fn commit_event(db: &Database, order: i64, event_type: &str) -> i64 {
        let event_type = event_type.to_owned();
        db.write(move |conn| {
            let seq = diesel::insert_into(order_events::table)
                .values((
                    order_events::order_id.eq(order),
                    order_events::event_id.eq(format!("{order}-{event_type}-{}", rand_id())),
                    order_events::event_type.eq(&event_type),
                    order_events::source.eq("orders"),
                    order_events::timestamp.eq("2026-11-27T12:00:00.000Z"),
                    order_events::payload.eq(r#"{"orderId":1,"productId":1}"#),
                ))
                .returning(order_events::seq)
                .get_result::<i64>(conn)?;
            Ok::<_, kafka::DbError>((seq, Vec::new()))
        })
        .await
        .unwrap()
    }

    fn rand_id() -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    /// Reads chunks until `n` event frames arrived (skipping hello and keep-alives): `(id,
    /// JSON)` of each.
    async fn read_frames(
        rx: &mut mpsc::Receiver<Bytes>,
        n: usize,
    ) -> Vec<(i64, serde_json::Value)> {
        let mut frames = Vec::new();
        while frames.len() < n {
            let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a frame within 10 s")
                .expect("the stream is open");
            let text = String::from_utf8(chunk.to_vec()).unwrap();
            if text.starts_with(':') || text.contains("event: hello") {
                continue;
            }
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .unwrap()
                .parse()
                .unwrap();
            let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            frames.push((id, serde_json::from_str(data).unwrap()));
        }
        frames
    }

    async fn hello(rx: &mut mpsc::Receiver<Bytes>) -> String {
        let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(chunk.to_vec()).unwrap()
    }

    fn start(tail: &EventTail, from: Option<i64>, buffer: usize) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(buffer);
        let tail = tail.clone();
        tokio::spawn(async move { tail.follow(from, tx).await });
        rx
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_after_a_seq_come_in_order_then_live_ones_as_they_commit() {
        let (_dir, db) = database().await;
        for t in ["OrderPlaced", "StockDecreased", "DeliveryStarted"] {
            commit_event(&db, 1, t).await;
        }
        let tail = EventTail::new(db.clone(), BROADCAST_CAPACITY, REPLAY_WINDOW_DEFAULT);
        let stop = CancellationToken::new();
        tokio::spawn(tail.clone().run(stop.clone()));

        let mut rx = start(&tail, Some(1), STREAM_BUFFER);
        assert!(hello(&mut rx).await.contains("id: 1\nevent: hello"));
        let caught_up = read_frames(&mut rx, 2).await;
        assert_eq!(
            caught_up.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [2, 3]
        );
        let (_, second) = &caught_up[0];
        assert_eq!(second["seq"], 2);
        assert_eq!(second["orderId"], 1);
        assert_eq!(second["eventType"], "StockDecreased");
        assert_eq!(second["source"], "orders");
        assert_eq!(second["payload"]["productId"], 1);
        for key in ["eventId", "causationId", "initiator", "timestamp"] {
            assert!(second.get(key).is_some(), "{key} missing in {second}");
        }

        // Live: each new row as it commits, in commit order, across orders.
        let mut expected = Vec::new();
        for (order, t) in [
            (1, "OrderCompleted"),
            (2, "OrderPlaced"),
            (1, "OrderCancelled"),
        ] {
            expected.push(commit_event(&db, order, t).await);
        }
        let live = read_frames(&mut rx, 3).await;
        assert_eq!(live.iter().map(|(id, _)| *id).collect::<Vec<_>>(), expected);
        assert_eq!(live[1].1["orderId"], 2);

        // A stream opened without a start point begins at the current end.
        let mut fresh = start(&tail, None, STREAM_BUFFER);
        assert!(
            hello(&mut fresh)
                .await
                .contains(&format!("id: {}\n", expected[2]))
        );
        let next = commit_event(&db, 3, "OrderPlaced").await;
        assert_eq!(read_frames(&mut fresh, 1).await[0].0, next);
        assert_eq!(read_frames(&mut rx, 1).await[0].0, next);

        // When the tail stops, the streams end.
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "the stream did not end with the tail");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_lags_catches_up_from_its_last_seq() {
        let (_dir, db) = database().await;
        // The broadcast keeps one batch and the stream buffers one frame: a client that does
        // not read while 60 rows commit one by one falls far behind.
        let tail = EventTail::new(db.clone(), 1, REPLAY_WINDOW_DEFAULT);
        let stop = CancellationToken::new();
        tokio::spawn(tail.clone().run(stop.clone()));
        let mut rx = start(&tail, Some(0), 1);
        hello(&mut rx).await;
        let mut committed = Vec::new();
        for i in 0..60 {
            committed.push(commit_event(&db, i % 7, "OrderPlaced").await);
        }
        let got = read_frames(&mut rx, 60).await;
        assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), committed);
        assert!(
            tail.resyncs.load(Ordering::Relaxed) > 0,
            "the stream never fell behind; the test proves nothing"
        );
        // Nothing more, nothing twice: the next frame is the next row.
        let next = commit_event(&db, 1, "OrderCompleted").await;
        assert_eq!(read_frames(&mut rx, 1).await[0].0, next);
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_opened_while_the_tail_was_idle_misses_nothing() {
        let (_dir, db) = database().await;
        let tail = EventTail::new(db.clone(), BROADCAST_CAPACITY, REPLAY_WINDOW_DEFAULT);
        tokio::spawn(tail.clone().run(CancellationToken::new()));
        // Nobody listens: the tail reads nothing for these.
        commit_event(&db, 1, "OrderPlaced").await;
        commit_event(&db, 1, "StockDecreased").await;
        let mut rx = start(&tail, Some(0), STREAM_BUFFER);
        hello(&mut rx).await;
        let caught_up = read_frames(&mut rx, 2).await;
        assert_eq!(
            caught_up.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [1, 2]
        );
        // The tail wakes up with a stream to feed: each row arrives without waiting for the
        // next commit.
        for t in ["DeliveryStarted", "OrderCompleted"] {
            let seq = commit_event(&db, 1, t).await;
            assert_eq!(read_frames(&mut rx, 1).await[0].0, seq);
        }
    }

    /// A stream asking for the whole history (`Last-Event-ID: 0`) gets the newest `window`
    /// rows only, after a `skipped` event saying where it resumes; a stream within the window
    /// gets no such event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_from_long_ago_starts_at_the_window_after_a_skipped_event() {
        let (_dir, db) = database().await;
        let mut committed = Vec::new();
        for i in 0..10 {
            committed.push(commit_event(&db, i, "OrderPlaced").await);
        }
        let tail = EventTail::new(db.clone(), BROADCAST_CAPACITY, 3);
        tokio::spawn(tail.clone().run(CancellationToken::new()));
        let mut rx = start(&tail, Some(0), STREAM_BUFFER);
        assert!(hello(&mut rx).await.contains("id: 0\nevent: hello"));
        let skipped = hello(&mut rx).await;
        let resume = committed[6];
        assert!(
            skipped.contains(&format!("id: {resume}\nevent: skipped\n")),
            "{skipped}"
        );
        let data: serde_json::Value = serde_json::from_str(
            skipped
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            data,
            serde_json::json!({"after": 0, "resumeAfter": resume, "window": 3})
        );
        let replayed = read_frames(&mut rx, 3).await;
        assert_eq!(
            replayed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            committed[7..]
        );
        // Within the window: every row after it, nothing skipped.
        let mut near = start(&tail, Some(committed[8]), STREAM_BUFFER);
        hello(&mut near).await;
        let next = hello(&mut near).await;
        assert!(
            next.starts_with(&format!("id: {}\ndata: ", committed[9])),
            "{next}"
        );
    }

    /// Streams read the database one at a time: while the turn is taken, a stream's catch-up
    /// waits (off the pool), and goes on once it is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_ups_take_turns_on_their_own_permits() {
        let (_dir, db) = database().await;
        let first = commit_event(&db, 1, "OrderPlaced").await;
        let tail = EventTail::new(db.clone(), BROADCAST_CAPACITY, REPLAY_WINDOW_DEFAULT);
        tokio::spawn(tail.clone().run(CancellationToken::new()));
        let turns = tail.reads.clone();
        let held = turns.acquire_many(CATCH_UP_READS as u32).await.unwrap();
        let mut rx = start(&tail, Some(0), STREAM_BUFFER);
        hello(&mut rx).await;
        let waited = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(waited.is_err(), "caught up without a turn: {waited:?}");
        // The pool itself is free meanwhile: other reads are not held up.
        db.read(last_seq).await.unwrap();
        drop(held);
        assert_eq!(read_frames(&mut rx, 1).await[0].0, first);
    }

    #[test]
    fn last_event_id_wins_over_after_and_bad_values_are_named() {
        let mut headers = HeaderMap::new();
        assert_eq!(start_point(&headers, None), Ok(None));
        assert_eq!(start_point(&headers, Some(7)), Ok(Some(7)));
        assert!(
            start_point(&headers, Some(-1))
                .unwrap_err()
                .contains("after")
        );
        headers.insert(
            header::HeaderName::from_static("last-event-id"),
            header::HeaderValue::from_static("42"),
        );
        assert_eq!(start_point(&headers, Some(7)), Ok(Some(42)));
        headers.insert(
            header::HeaderName::from_static("last-event-id"),
            header::HeaderValue::from_static("x"),
        );
        assert!(
            start_point(&headers, None)
                .unwrap_err()
                .contains("Last-Event-ID")
        );
    }

    #[test]
    fn links_default_to_the_page_host_and_bad_urls_name_the_variable() {
        assert_eq!(hostname("127.0.0.1:8081"), "127.0.0.1");
        assert_eq!(hostname("[::1]:8081"), "[::1]");
        assert_eq!(hostname("[::1]"), "[::1]");
        assert_eq!(hostname("mall.local"), "mall.local");
        assert_eq!(parse_link("PRODUCTS_URL", None).unwrap(), None);
        assert_eq!(parse_link("PRODUCTS_URL", Some(" ".into())).unwrap(), None);
        assert_eq!(
            parse_link("PRODUCTS_URL", Some("http://127.0.0.1:18085/".into())).unwrap(),
            Some("http://127.0.0.1:18085".into())
        );
        let err = parse_link("DELIVERY_URL", Some("127.0.0.1:8082".into())).unwrap_err();
        assert!(err.to_string().contains("DELIVERY_URL"), "{err}");
    }

    #[actix_web::test]
    async fn the_page_its_assets_and_config_are_served_and_errors_are_json() {
        use actix_web::{App, test};
        let (_dir, db) = database().await;
        let db_for_orders = db.clone();
        let dashboard = Dashboard::new(
            db.clone(),
            Links {
                products: Some("http://127.0.0.1:18085".into()),
                delivery: None,
            },
            REPLAY_WINDOW_DEFAULT,
        );
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(db.clone()))
                .configure(kafka::http::configure)
                .configure(|cfg| dashboard.configure(cfg)),
        )
        .await;
        for (path, content_type, needle) in [
            ("/", "text/html", "data-testid=\"orders\""),
            ("/dashboard/app.js", "text/javascript", "EventSource"),
            ("/dashboard/style.css", "text/css", "timeline"),
        ] {
            let resp =
                test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await;
            assert_eq!(resp.status(), 200, "{path}");
            let ct = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(ct.starts_with(content_type), "{path}: {ct}");
            let body = test::read_body(resp).await;
            assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");
        }
        let config: serde_json::Value = test::call_and_read_body_json(
            &app,
            test::TestRequest::get()
                .uri("/dashboard/config")
                .insert_header((header::HOST, "10.1.2.3:8081"))
                .to_request(),
        )
        .await;
        assert_eq!(config["productsUrl"], "http://127.0.0.1:18085");
        assert_eq!(config["deliveryUrl"], "http://10.1.2.3:8082");
        assert_eq!(config["newestOrderId"], 0);
        db_for_orders
            .write(|conn| {
                let now = "2026-11-27T12:00:00Z".to_owned();
                let new = crate::store::NewOrder::fixture("OrderPlaced", now);
                crate::store::insert_order(conn, &new)?;
                Ok::<_, DbError>(((), Vec::new()))
            })
            .await
            .unwrap();
        let config: serde_json::Value = test::call_and_read_body_json(
            &app,
            test::TestRequest::get()
                .uri("/dashboard/config")
                .to_request(),
        )
        .await;
        assert_eq!(config["newestOrderId"], 1);

        let resp = test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/events/stream?after=-3")
                .to_request(),
        )
        .await;
        assert_eq!(resp.status(), 422);
        let body: serde_json::Value = test::read_body_json(resp).await;
        assert!(body["error"].as_str().unwrap().contains("after"), "{body}");
        let resp = test::call_service(
            &app,
            test::TestRequest::post().uri("/events/stream").to_request(),
        )
        .await;
        assert_eq!(resp.status(), 405);
        let resp = test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/events/stream")
                .insert_header(("Last-Event-ID", "abc"))
                .to_request(),
        )
        .await;
        assert_eq!(resp.status(), 422);
        let resp = test::call_service(
            &app,
            test::TestRequest::get().uri("/events/stream").to_request(),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get(header::CONTENT_TYPE).unwrap(),
            "text/event-stream"
        );
    }
}
