//! A cap on concurrent connections per client address (`HTTP_MAX_CONNECTIONS_PER_ADDRESS`),
//! so one client cannot take every connection, worker slot and file descriptor of a service
//! while others wait.
//!
//! The HTTP server's `on_connect` hook ([`ConnectionLimit::on_connect`]) counts each new
//! connection under its peer's IP address and leaves a [`ConnectionGuard`] in the connection's
//! data; the guard is dropped with the connection (actix drops a connection's data when it
//! closes), which gives the place back. A connection opened while its address already had the
//! maximum is over the cap for as long as it lives: [`limit`] answers each of its requests
//! `429 {"error": …}` with `Retry-After: 1` and `Connection: close`, so it closes at once, and
//! the address's connections that came first keep working. The hook cannot refuse a
//! connection itself: the answer has to be an HTTP one for the client to learn why.
//!
//! The default, 256, is far above what the mall's own clients open from one address: the
//! dashboard (a browser opens at most 6 per host, plus one event stream), the test suites (at
//! most 65 at once: the event streams' bound and one more) and the chaos workload (8 in
//! flight). `saga-bench`'s generator, up to 4,096 requests in flight from 127.0.0.1, raises it
//! for the services it starts.

use crate::http::error_json;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use std::any::Any;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// `HTTP_MAX_CONNECTIONS_PER_ADDRESS` when unset.
pub const DEFAULT_MAX_PER_ADDRESS: usize = 256;
/// The variable that sets the cap (named in the refusal, so an operator finds it).
pub const SETTING: &str = "HTTP_MAX_CONNECTIONS_PER_ADDRESS";

/// Open connections per client address, and the most one address may have.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max: usize,
}

/// One open connection, counted under its address until dropped (the connection closed).
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
    /// Whether its address had fewer than the maximum when it opened.
    admitted: bool,
    max: usize,
}

impl ConnectionLimit {
    /// At most `max` connections at once from one address.
    pub fn new(max: usize) -> Self {
        ConnectionLimit {
            open: Arc::default(),
            max,
        }
    }

    /// Counts a new connection from `peer`; it is over the cap if `peer` already had `max`.
    pub fn open(&self, peer: IpAddr) -> ConnectionGuard {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(peer).or_default();
        *count += 1;
        let admitted = *count <= self.max;
        if *count == self.max + 1 {
            log::warn!(
                "{peer} has {} connections open; more are answered 429 until some close ({SETTING})",
                self.max
            );
        }
        ConnectionGuard {
            open: self.open.clone(),
            peer,
            admitted,
            max: self.max,
        }
    }

    /// Connections open from `peer` now.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&peer).copied().unwrap_or_default()
    }

    /// For [`actix_web::HttpServer::on_connect`]: counts a TCP connection by its peer's address
    /// and keeps the guard in the connection's data, dropped when the connection ends.
    /// Anything else (a Unix socket) is not counted.
    pub fn on_connect(&self, connection: &dyn Any, data: &mut Extensions) {
        let peer = connection
            .downcast_ref::<actix_web::rt::net::TcpStream>()
            .and_then(|stream| stream.peer_addr().ok());
        if let Some(peer) = peer {
            data.insert(self.open(peer.ip()));
        }
    }
}

impl ConnectionGuard {
    /// Whether this connection may be served.
    pub fn admitted(&self) -> bool {
        self.admitted
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                // No entry per address ever seen: the map holds only addresses with connections.
                open.remove(&self.peer);
            }
        }
    }
}

/// The middleware: a request on a connection over its address's cap is answered 429 with
/// `Retry-After: 1` and `Connection: close`; every other request passes.
pub async fn limit<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let over = req
        .conn_data::<ConnectionGuard>()
        .filter(|guard| !guard.admitted())
        .map(|guard| (guard.peer, guard.max));
    let Some((peer, max)) = over else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    };
    let mut refused = error_json(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "too many connections from {peer}: at most {max} at once ({SETTING}); close one, \
             or reuse one, and retry"
        ),
    );
    refused
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    // Closed after this answer: its place goes back at once.
    refused
        .head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    Ok(req.into_response(refused).map_into_right_body())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{App, HttpResponse, HttpServer, web};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn the_connection_past_the_cap_is_refused_and_a_closed_one_frees_a_place() {
        let limit = ConnectionLimit::new(2);
        let (me, other): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let first = limit.open(me);
        let second = limit.open(me);
        let third = limit.open(me);
        assert!(first.admitted() && second.admitted());
        assert!(!third.admitted(), "a third connection from one address");
        assert!(
            limit.open(other).admitted(),
            "another address has its own count"
        );
        assert_eq!(limit.open_from(me), 3);
        drop(third);
        drop(first);
        assert_eq!(limit.open_from(me), 1);
        assert!(limit.open(me).admitted(), "a place came free");
        drop(second);
        assert_eq!(limit.open_from(me), 0);
        assert!(
            limit.open.lock().unwrap().is_empty(),
            "no entry left behind"
        );
    }

    /// Sends a GET on `socket` and reads one answer: status, head and body.
    async fn get(socket: &mut TcpStream) -> (u16, String) {
        socket
            .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        let complete = |a: &[u8]| {
            let text = String::from_utf8_lossy(a);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or_default();
            body.len() >= length
        };
        while !complete(&answer) {
            let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(n > 0, "closed before a whole answer: {answer:?}");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text[9..12].parse().unwrap();
        (status, text)
    }

    /// A real server on port 0 with a cap of 3: the fourth connection is answered 429 (JSON
    /// naming the setting, `Retry-After`, closed by the server) while the first three keep
    /// being served; once one closes, a new connection is served again.
    #[actix_web::test]
    async fn a_server_answers_429_past_the_cap_and_serves_again_when_one_closes() {
        let limit = ConnectionLimit::new(3);
        let counted = limit.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = HttpServer::new(|| {
            App::new()
                .wrap(actix_web::middleware::from_fn(super::limit))
                .route(
                    "/",
                    web::get().to(|| async { HttpResponse::Ok().body("hi") }),
                )
        })
        .workers(1)
        .on_connect(move |conn, data| limit.on_connect(conn, data))
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);

        let mut open = Vec::new();
        for _ in 0..3 {
            let mut socket = TcpStream::connect(address).await.unwrap();
            assert_eq!(get(&mut socket).await.0, 200);
            open.push(socket);
        }
        let mut fourth = TcpStream::connect(address).await.unwrap();
        let (status, text) = get(&mut fourth).await;
        assert_eq!(status, 429, "{text}");
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("retry-after: 1"), "{text}");
        assert!(lower.contains("connection: close"), "{text}");
        assert!(text.contains(SETTING), "{text}");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut rest));
        assert!(
            closed.await.is_ok(),
            "the server did not close the refused connection"
        );
        // The first three are still served, on their kept-alive connections.
        for socket in &mut open {
            assert_eq!(get(socket).await.0, 200);
        }
        drop(open.pop());
        let mut served_again = false;
        for _ in 0..50 {
            let mut socket = TcpStream::connect(address).await.unwrap();
            if get(&mut socket).await.0 == 200 {
                served_again = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served_again, "no place came free after a connection closed");
        assert!(counted.open_from([127, 0, 0, 1].into()) <= 3);
        handle.stop(false).await;
    }
}
