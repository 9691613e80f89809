//! The chaos run's HTTP client: every request has a timeout, and every answer is recorded —
//! a 5xx (other than from `/health`) is a violation; a connection error or a timeout (a killed
//! or stopped service) is not, it is only counted.

use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What came back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A status and the body (JSON, or the text as a JSON string).
    Status(u16, Value),
    /// No answer: connection refused or reset, or the timeout.
    NoAnswer(String),
}

impl Reply {
    /// The status, if there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(s, _) => Some(*s),
            Reply::NoAnswer(_) => None,
        }
    }

    /// The body of a 2xx answer.
    pub fn ok_body(&self) -> Option<&Value> {
        match self {
            Reply::Status(s, v) if (200..300).contains(s) => Some(v),
            _ => None,
        }
    }
}

/// Counts of what the client saw.
#[derive(Debug, Default, Clone)]
pub struct HttpLog {
    /// Requests made, other than /health.
    pub requests: u64,
    /// Requests that got no answer (connection error, timeout), other than /health.
    pub no_answer: u64,
    /// Every 5xx other than from /health: `METHOD url → status body`.
    pub server_errors: Vec<String>,
    /// Answers by `(what, status)`, for the summary; `what` is a short name of the request.
    pub statuses: BTreeMap<(String, String), u64>,
}

/// A cloneable client that records into one [`HttpLog`].
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    quick: reqwest::Client,
    log: Arc<Mutex<HttpLog>>,
}

impl Client {
    /// A client with a 5 s timeout per request (1 s for /health probes).
    pub fn new() -> Self {
        let build = |timeout: Duration| {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(2))
                .pool_max_idle_per_host(16)
                .build()
                .unwrap_or_default()
        };
        Client {
            http: build(Duration::from_secs(5)),
            quick: build(Duration::from_secs(1)),
            log: Arc::new(Mutex::new(HttpLog::default())),
        }
    }

    /// The log so far.
    pub fn log(&self) -> MutexGuard<'_, HttpLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a request and records the outcome under `what` (e.g. `POST /orders`).
    pub async fn call(&self, what: &str, method: &str, url: &str, body: Option<Value>) -> Reply {
        self.call_keyed(what, method, url, body, None).await
    }

    /// [`Client::call`] with an `Idempotency-Key`, when given.
    pub async fn call_keyed(
        &self,
        what: &str,
        method: &str,
        url: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> Reply {
        let health = url.ends_with("/health");
        let client = if health { &self.quick } else { &self.http };
        let Ok(m) = reqwest::Method::from_bytes(method.as_bytes()) else {
            return Reply::NoAnswer(format!("bad method {method}"));
        };
        let mut request = client.request(m, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let reply = match request.send().await {
            Err(e) => Reply::NoAnswer(e.to_string()),
            Ok(response) => {
                let status = response.status().as_u16();
                match response.text().await {
                    Err(e) => Reply::NoAnswer(format!("{status}, body lost: {e}")),
                    Ok(text) => Reply::Status(
                        status,
                        serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    ),
                }
            }
        };
        if !health {
            let mut log = self.log();
            log.requests += 1;
            let label = match &reply {
                Reply::Status(s, _) => s.to_string(),
                Reply::NoAnswer(_) => {
                    log.no_answer += 1;
                    "no answer".to_owned()
                }
            };
            *log.statuses.entry((what.to_owned(), label)).or_default() += 1;
            if let Reply::Status(s, body) = &reply
                && *s >= 500
            {
                let mut body = body.to_string();
                body.truncate(300);
                log.server_errors
                    .push(format!("{method} {url} → {s} {body}"));
            }
        }
        reply
    }

    /// GET /health: the status, or why there was none.
    pub async fn health(&self, base: &str) -> Result<u16, String> {
        match self
            .call("GET /health", "GET", &format!("{base}/health"), None)
            .await
        {
            Reply::Status(s, _) => Ok(s),
            Reply::NoAnswer(e) => Err(e),
        }
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}
