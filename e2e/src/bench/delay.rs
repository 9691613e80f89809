//! A TCP proxy that delays every byte by a fixed time in each direction: PostgreSQL as if on
//! another host, where a statement costs a network round trip. The bench puts it between the
//! services and the server to measure what more instances buy when one instance is bound by
//! latency rather than CPU (this machine has no `tc netem`: its kernel lacks `sch_netem`).
//!
//! Delay, not bandwidth: a chunk read at `t` is written at `t + delay`, in order, whatever
//! follows it, so a stream of statements pays the delay once per round trip, as on a network.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running proxy; dropping it stops accepting (open connections end with their peers).
pub struct DelayProxy {
    /// Where clients connect.
    pub local: SocketAddr,
    /// The accept loop.
    accepting: JoinHandle<()>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl DelayProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`, each
    /// direction delayed by `delay`.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        forward(client, server, delay).await;
                    }
                });
            }
        });
        Ok(DelayProxy { local, accepting })
    }
}

/// Both directions of one connection until either side closes.
async fn forward(client: TcpStream, server: TcpStream, delay: Duration) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = one_way(client_read, server_write, delay) => {}
        _ = one_way(server_read, client_write, delay) => {}
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn one_way(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if chunks
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    // Reading ends first on a close; the writer still delivers what was read.
    tokio::join!(reading, writing);
}

/// Round trips of `SELECT 1` on a connection to `url`, ms each: what one statement costs the
/// services through the proxy (on a busy machine, more than twice the delay: every hop waits
/// for the proxy's turn on a core).
pub fn statement_round_trips(url: &str, count: usize) -> Result<Vec<f64>, String> {
    use diesel::Connection;
    use diesel::connection::SimpleConnection;
    let mut conn = diesel::PgConnection::establish(url).map_err(|e| e.to_string())?;
    (0..count)
        .map(|_| {
            let started = std::time::Instant::now();
            conn.batch_execute("SELECT 1").map_err(|e| e.to_string())?;
            Ok(started.elapsed().as_secs_f64() * 1000.0)
        })
        .collect()
}

/// `url` (`postgres://user@host:port/db…`) with its host and port replaced by `to`'s.
pub fn through(url: &str, to: SocketAddr) -> Result<String, String> {
    let start = url.find("://").ok_or("not a URL")? + 3;
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let user = &authority[..authority.len() - host_port.len()];
    Ok(format!("{}{user}{to}{}", &url[..start], &url[end..]))
}

/// The host and port of `url` as a socket address (port 5432 when absent).
pub fn address_of(url: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let start = url.find("://").ok_or("not a URL")? + 3;
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("{with_port}: {e}"))?
        .next()
        .ok_or(format!("{with_port}: no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_pointed_at_the_proxy_and_keeps_the_rest() {
        let to: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            through("postgres://postgres@127.0.0.1:5433/postgres", to).unwrap(),
            "postgres://postgres@127.0.0.1:4000/postgres"
        );
        assert_eq!(
            through("postgres://u:p@db:5432/x?sslmode=disable", to).unwrap(),
            "postgres://u:p@127.0.0.1:4000/x?sslmode=disable"
        );
        assert_eq!(
            address_of("postgres://u@127.0.0.1:5433/postgres").unwrap(),
            "127.0.0.1:5433".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn every_byte_arrives_in_order_and_no_sooner_than_the_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let delay = Duration::from_millis(20);
        let proxy = DelayProxy::start(upstream, delay).await.unwrap();
        let mut c = TcpStream::connect(proxy.local).await.unwrap();
        let sent = Instant::now();
        let message: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message);
        // There and back: the delay twice.
        assert!(sent.elapsed() >= 2 * delay, "{:?}", sent.elapsed());
    }
}
