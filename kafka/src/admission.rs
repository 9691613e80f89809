//! Admission control for requests that change state (POST, PATCH, PUT, DELETE): a few run at
//! once, a bounded number wait their turn, and the rest are told at once to come back later.
//!
//! Why: a service's writes are serial (one writer per database), and its consumer's batches
//! queue for the same writer as HTTP writes. Offered more orders than it can apply, a service
//! without a bound let every request wait: thousands queued ahead of the consumer, so sagas
//! already accepted stopped moving, and memory grew with the queue. Bounded, the consumer gets
//! its turn in the next commit, accepted sagas finish, and the surplus gets a quick
//! `503` with `Retry-After` that a client can act on. Reads are not limited here.
//!
//! A writing request's body is read before it waits for a turn, within
//! [`BODY_READ_TIMEOUT`]: a few dozen clients trickling bodies would otherwise hold every turn.

use crate::http::{error_json, too_busy};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::Payload;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::Method;
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Writing requests that run at once. Their writes queue for the writer thread, which commits
/// everything queued in one transaction (the consumer's batch included), so more running
/// means larger commits, not a later turn for the consumer. Measured at 1,000 orders/s offered
/// (memory broker, two runs each): 4 → 267–371 sagas/s, 32 → 441–454.
pub const RUNNING: usize = 32;
/// Writing requests that may wait for a turn; beyond it they are refused with a 503. About a
/// second of work at the rate a service sustains here, so a waiting request's answer still
/// comes well within a client's patience.
pub const WAITING: usize = 256;

/// How long a writing request's body may take to arrive, read before it waits for a turn;
/// past it the answer is 408 and nothing is done. Bodies are at most 64 KiB.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits and who is inside them; shared by every HTTP worker of a service.
pub struct Admission {
    running: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl Admission {
    /// `running` requests at once, `max_waiting` more waiting.
    pub fn new(running: usize, max_waiting: usize) -> Self {
        Admission {
            running: Semaphore::new(running),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Requests waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(RUNNING, WAITING)
    }
}

/// Counts a request as waiting while it exists.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The middleware: reads pass; a writing request waits for one of the running turns, or is
/// answered `503 {"error": …}` with `Retry-After: 1` when the waiting line is full.
pub async fn admit<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let writes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let Some(admission) = req
        .app_data::<web::Data<Admission>>()
        .filter(|_| writes)
        .cloned()
    else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    };
    // The body first, bounded in time: a client that trickles its body must not hold a turn
    // that ordinary writes wait for.
    let mut req = req;
    let body = tokio::time::timeout(BODY_READ_TIMEOUT, req.extract::<web::Bytes>()).await;
    let body = match body {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            let status = e.as_response_error().status_code();
            let refused = error_json(status, format!("cannot read the request body: {e}"));
            return Ok(req.into_response(refused).map_into_right_body());
        }
        Err(_) => {
            let refused = error_json(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s; nothing was done",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            );
            return Ok(req.into_response(refused).map_into_right_body());
        }
    };
    let replay: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<web::Bytes, PayloadError>>>,
    > = Box::pin(futures_util::stream::once(async move {
        Ok::<_, PayloadError>(body)
    }));
    req.set_payload(Payload::from(replay));
    let permit = match admission.running.try_acquire() {
        Ok(permit) => permit,
        Err(_) => {
            let queued = admission.waiting.fetch_add(1, Ordering::Relaxed);
            let _waiting = Waiting(&admission.waiting);
            if queued >= admission.max_waiting {
                let refused = too_busy(format!(
                    "too busy: {queued} requests are waiting to change state; \
                     nothing was done, retry in a second"
                ));
                return Ok(req.into_response(refused).map_into_right_body());
            }
            admission
                .running
                .acquire()
                .await
                .map_err(actix_web::error::ErrorServiceUnavailable)?
        }
    };
    let response = next.call(req).await;
    drop(permit);
    response.map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::{StatusCode, header};
    use actix_web::{App, HttpResponse, test as actix_test};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Notify;

    /// A route that holds its request until `release` is notified.
    fn app(
        admission: web::Data<Admission>,
        release: Arc<Notify>,
    ) -> App<
        impl actix_web::dev::ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<impl MessageBody>,
            Error = actix_web::Error,
            InitError = (),
        >,
    > {
        App::new()
            .wrap(actix_web::middleware::from_fn(admit))
            .app_data(admission)
            .route(
                "/slow",
                web::post().to(move || {
                    let release = release.clone();
                    async move {
                        release.notified().await;
                        HttpResponse::Created().finish()
                    }
                }),
            )
            .route("/read", web::get().to(HttpResponse::Ok))
    }

    #[actix_web::test]
    async fn writes_beyond_the_running_and_waiting_bounds_get_a_503_and_reads_pass() {
        let admission = web::Data::new(Admission::new(1, 1));
        let release = Arc::new(Notify::new());
        let service = actix_test::init_service(app(admission.clone(), release.clone())).await;
        let post = || actix_test::TestRequest::post().uri("/slow").to_request();
        // One runs, one waits.
        let running = actix_test::call_service(&service, post());
        let waiting = actix_test::call_service(&service, post());
        let (running, waiting) = (Box::pin(running), Box::pin(waiting));
        let mut both = futures_util::future::join(running, waiting);
        // Drive both far enough to take the turn and the waiting place.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut both)
                .await
                .is_err()
        );
        assert_eq!(admission.waiting(), 1);
        // The third is refused at once, saying why, with a hint when to come back.
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            actix_test::call_service(&service, post()),
        )
        .await
        .expect("a full line refuses at once");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let body: serde_json::Value = actix_test::read_body_json(refused).await;
        assert!(
            body["error"].as_str().unwrap().contains("too busy"),
            "{body}"
        );
        // Reads are not held.
        let read = actix_test::TestRequest::get().uri("/read").to_request();
        assert_eq!(
            actix_test::call_service(&service, read).await.status(),
            StatusCode::OK
        );
        // Released (the second notification is kept for the waiting one), both are served.
        release.notify_one();
        release.notify_one();
        let (first, second) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        assert_eq!(second.status(), StatusCode::CREATED);
        assert_eq!(admission.waiting(), 0);
    }
}
