//! A TCP proxy in front of one broker listener that can freeze chosen clients' connections:
//! the connection stays open, what is sent on it is swallowed and nothing comes back — what a
//! half-dead network path, a stuck NAT entry or a broker thread that stopped answering looks
//! like to a client. Only connections open at the moment of the freeze are frozen; new ones
//! pass, as they would through a path that healed.
//!
//! Each connection is known by the `client.id` of its first request (every Kafka request
//! header carries it), which the services set to `<instance>/<role>` (`delivery/consumer`).
//! The broker advertises the proxy's address on the listener behind it, so clients that
//! bootstrap through the proxy stay on it ([`crate::broker::ExtraListeners::proxied_port`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// One proxied connection, as the test sees it.
struct Connection {
    /// The `client.id` of its first request, once that arrived.
    client_id: Arc<OnceLock<String>>,
    /// Set by [`KafkaProxy::freeze`]; never cleared.
    frozen: Arc<AtomicBool>,
    /// When the client connected.
    opened: Instant,
    /// Cleared when either side closed it.
    open: Arc<AtomicBool>,
}

/// The proxy: an accepting thread and two copying threads per connection; dropping it closes
/// every connection and stops the threads.
pub struct KafkaProxy {
    /// Where clients connect.
    port: u16,
    connections: Arc<Mutex<Vec<Connection>>>,
    /// Tells every thread to end; the accepting thread is woken by a connection of our own.
    stop: Arc<AtomicBool>,
}

impl KafkaProxy {
    /// Listens on 127.0.0.1:`port` and forwards every connection to `broker`.
    pub fn start(port: u16, broker: SocketAddr) -> std::io::Result<KafkaProxy> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let connections = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (conns, stopping) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(broker) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let connection = Connection {
                    client_id: Arc::new(OnceLock::new()),
                    frozen: Arc::new(AtomicBool::new(false)),
                    opened: Instant::now(),
                    open: Arc::new(AtomicBool::new(true)),
                };
                pipe(&client, &upstream, &connection, &stopping, true);
                pipe(&upstream, &client, &connection, &stopping, false);
                conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(connection);
            }
        });
        Ok(KafkaProxy {
            port,
            connections,
            stop,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes every open connection whose client id `matches`; returns how many.
    pub fn freeze(&self, matches: impl Fn(&str) -> bool) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let mut frozen = 0;
        for c in connections.iter() {
            let open = c.open.load(Ordering::SeqCst);
            if open && c.client_id.get().is_some_and(|id| matches(id)) {
                c.frozen.store(true, Ordering::SeqCst);
                frozen += 1;
            }
        }
        frozen
    }

    /// The frozen connections still open: the client has not given them up.
    pub fn frozen_open(&self) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections
            .iter()
            .filter(|c| c.frozen.load(Ordering::SeqCst) && c.open.load(Ordering::SeqCst))
            .count()
    }

    /// Connections opened after `since` whose client id `matches`.
    pub fn opened_since(&self, since: Instant, matches: impl Fn(&str) -> bool) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections
            .iter()
            .filter(|c| c.opened > since && c.client_id.get().is_some_and(|id| matches(id)))
            .count()
    }
}

impl Drop for KafkaProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` → `to` on a thread of its own until either side closes (then both are shut,
/// so the opposite copy ends too). From the client, the first request's `client.id` is read
/// on the way. Frozen, it keeps reading — to see the client go — but forwards nothing.
fn pipe(
    from: &TcpStream,
    to: &TcpStream,
    connection: &Connection,
    stop: &Arc<AtomicBool>,
    from_client: bool,
) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        let _ = from.shutdown(Shutdown::Both);
        return;
    };
    let (client_id, frozen, open, stop) = (
        connection.client_id.clone(),
        connection.frozen.clone(),
        connection.open.clone(),
        stop.clone(),
    );
    std::thread::spawn(move || {
        let mut head = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if from_client && client_id.get().is_none() {
                head.extend_from_slice(&buf[..n]);
                if let Some(id) = request_client_id(&head) {
                    let _ = client_id.set(id);
                }
            }
            if frozen.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        open.store(false, Ordering::SeqCst);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// The `client.id` of the request at the start of `bytes`, once enough has arrived: the
/// header is size (4), api key (2), api version (2), correlation id (4), then the client id
/// as a length-prefixed string (2; -1 for none) in every header version that has one.
fn request_client_id(bytes: &[u8]) -> Option<String> {
    let len = i16::from_be_bytes(bytes.get(12..14)?.try_into().ok()?);
    if len < 0 {
        return Some(String::new());
    }
    let id = bytes.get(14..14 + len as usize)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_id_is_read_from_the_first_request_header() {
        let mut request = Vec::new();
        request.extend_from_slice(&40i32.to_be_bytes()); // size
        request.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
        request.extend_from_slice(&3i16.to_be_bytes());
        request.extend_from_slice(&7i32.to_be_bytes());
        request.extend_from_slice(&17i16.to_be_bytes());
        request.extend_from_slice(b"delivery/consumer");
        assert_eq!(request_client_id(&request[..20]), None, "not all there yet");
        assert_eq!(
            request_client_id(&request).as_deref(),
            Some("delivery/consumer")
        );
    }

    #[test]
    fn a_frozen_connection_stays_open_and_passes_nothing_while_new_ones_pass() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = stream;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let port = crate::stack::free_port().unwrap();
        let proxy = KafkaProxy::start(port, echo_addr).unwrap();
        let hello = |id: &str| {
            let mut r = Vec::new();
            r.extend_from_slice(&0i32.to_be_bytes());
            r.extend_from_slice(&[0, 18, 0, 3, 0, 0, 0, 1]);
            r.extend_from_slice(&(id.len() as i16).to_be_bytes());
            r.extend_from_slice(id.as_bytes());
            r
        };
        let talk = |s: &mut TcpStream, bytes: &[u8]| -> bool {
            s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .unwrap();
            s.write_all(bytes).unwrap();
            let mut back = vec![0u8; bytes.len()];
            s.read_exact(&mut back).is_ok() && back == bytes
        };
        let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(talk(&mut a, &hello("x/consumer")));
        assert!(talk(&mut b, &hello("x/probe")));
        assert_eq!(proxy.freeze(|id| id.ends_with("/consumer")), 1);
        assert!(
            !talk(&mut a, b"ping"),
            "a frozen connection answers nothing"
        );
        assert!(talk(&mut b, b"ping"), "the others go on");
        let since = Instant::now();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(
            talk(&mut c, &hello("x/consumer")),
            "a new connection passes"
        );
        assert_eq!(proxy.opened_since(since, |id| id == "x/consumer"), 1);
        assert_eq!(proxy.frozen_open(), 1);
        drop(a);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(proxy.frozen_open(), 0, "the client closing it is seen");
    }
}
