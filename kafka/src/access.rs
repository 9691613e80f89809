//! Who may reach a service from a browser: the `Host` it answers for, the web origins that may
//! call it across origins, and the media type of requests that change state. One middleware
//! ([`guard`]) checks all three for every service, before CORS, admission and the handlers.
//!
//! Why each:
//! - **Host.** A page on `evil.example` whose name the attacker re-points at 127.0.0.1 (DNS
//!   rebinding) is *same-origin* with the mall as far as the browser knows; only the `Host`
//!   header, still `evil.example`, tells. Requests for a host the service does not answer for
//!   get 421.
//! - **Origin.** A browser sends `Origin` on every cross-origin request and on same-origin
//!   writes. Anything but the service's own origin or one listed in `CORS_ORIGINS` gets 403,
//!   preflights included, so no page elsewhere can read the mall or act on it (a "simple"
//!   request, a form post, is refused too, not only left unreadable).
//! - **Content-Type.** A write must say `application/json` (a form or `text/plain` post is what
//!   a page can send without a preflight): 415 otherwise.
//!
//! Clients that are not browsers (curl, httpie) send no `Origin` and their own `Host`, so the seed
//! lab works unchanged.

use crate::http::error_json;
use crate::settings::{ConfigError, env_or};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};

/// Host names every service answers for, whatever it binds: the loopback names.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];
/// `CORS_ORIGINS` when unset: orders' dashboard on a default install, which calls products and
/// delivery from its own origin.
const DEFAULT_CORS_ORIGINS: &str = "http://127.0.0.1:8081,http://localhost:8081";

/// The hosts and origins a service answers for: `ALLOWED_HOSTS`, `CORS_ORIGINS` and `HOST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSettings {
    /// Host names (no port) accepted in the `Host` header, lower case: the loopback names, the
    /// address the service binds unless it is a wildcard, and `ALLOWED_HOSTS`.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) allowed to call across origins: `CORS_ORIGINS`.
    pub cors_origins: Vec<String>,
}

impl AccessSettings {
    /// Reads `ALLOWED_HOSTS` and `CORS_ORIGINS` (comma-separated); `bind` is `HOST`.
    pub fn from_env(bind: &str) -> Result<Self, ConfigError> {
        Self::parse(
            bind,
            &env_or("ALLOWED_HOSTS", String::new())?,
            &env_or("CORS_ORIGINS", DEFAULT_CORS_ORIGINS.to_string())?,
        )
    }

    /// The settings for a service bound to `bind` with these lists; an origin that is not
    /// `http(s)://host[:port]` is an error naming `CORS_ORIGINS`.
    pub fn parse(bind: &str, allowed_hosts: &str, cors_origins: &str) -> Result<Self, ConfigError> {
        let list = |text: &str| -> Vec<String> {
            text.split(',')
                .map(|item| item.trim().to_ascii_lowercase())
                .filter(|item| !item.is_empty())
                .collect()
        };
        let mut hosts: Vec<String> = LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect();
        let bind = bracketed(&bind.trim().to_ascii_lowercase());
        if !matches!(bind.as_str(), "" | "0.0.0.0" | "[::]") && !hosts.contains(&bind) {
            hosts.push(bind);
        }
        for host in list(allowed_hosts).iter().map(|h| bracketed(h)) {
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        let mut origins = Vec::new();
        for origin in list(cors_origins) {
            let origin = origin.trim_end_matches('/').to_owned();
            let rest = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            match rest {
                Some(rest) if !rest.is_empty() && !rest.contains(['/', '*', ' ']) => {
                    origins.push(origin)
                }
                _ => {
                    return Err(ConfigError {
                        name: "CORS_ORIGINS".into(),
                        value: cors_origins.into(),
                        reason: format!(
                            "{origin:?} is not an origin like http://127.0.0.1:8081 \
                             (no wildcard, no path)"
                        ),
                    });
                }
            }
        }
        Ok(AccessSettings {
            allowed_hosts: hosts,
            cors_origins: origins,
        })
    }

    /// Whether `host` (the `Host` header: a name or address, with or without a port) is one
    /// this service answers for.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let name = host_name(&host);
        self.allowed_hosts.iter().any(|h| h == name)
    }

    /// Whether a request from `origin` to a service reached as `host` may be answered: its
    /// own origin, or one listed in `CORS_ORIGINS`.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.to_ascii_lowercase();
        let same_origin = host.is_some_and(|host| {
            let host = host.to_ascii_lowercase();
            origin == format!("http://{host}") || origin == format!("https://{host}")
        });
        same_origin || self.cors_origins.contains(&origin)
    }

    /// The CORS layer: adds the headers for the allowed origins only (never a wildcard, never
    /// a reflected origin); [`guard`] has already refused the others.
    pub fn cors(&self) -> actix_cors::Cors {
        let access = self.clone();
        actix_cors::Cors::default()
            .allowed_origin_fn(move |origin, head| {
                let host = head
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok());
                origin
                    .to_str()
                    .is_ok_and(|origin| access.origin_allowed(origin, host))
            })
            .allowed_methods(["GET", "POST", "PATCH"])
            .allowed_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("idempotency-key"),
                header::HeaderName::from_static("last-event-id"),
            ])
            .max_age(3600)
    }
}

/// `::1` → `[::1]`: IPv6 addresses appear bracketed in `Host`.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The name part of a `Host` header: `[::1]:8081` → `[::1]`, `localhost:8081` → `localhost`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Why a request is refused before any handler sees it.
fn refusal(access: &AccessSettings, method: &Method, headers: &HeaderMap) -> Option<HttpResponse> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
    };
    let host = text(header::HOST);
    // A request without Host (HTTP/1.0) cannot come from a browser; one with a Host must name
    // this service.
    if headers.contains_key(header::HOST) && !host.is_some_and(|h| access.host_allowed(h)) {
        return Some(error_json(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {:?} is not a name this service answers for ({}); ALLOWED_HOSTS adds names",
                host.unwrap_or("(not text)"),
                access.allowed_hosts.join(", ")
            ),
        ));
    }
    if headers.contains_key(header::ORIGIN) {
        let origin = text(header::ORIGIN);
        if !origin.is_some_and(|o| access.origin_allowed(o, host)) {
            return Some(error_json(
                StatusCode::FORBIDDEN,
                format!(
                    "Origin {:?} may not call this service; CORS_ORIGINS lists the web origins \
                     that may",
                    origin.unwrap_or("(not text)")
                ),
            ));
        }
    }
    let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if writes {
        let content_type = text(header::CONTENT_TYPE);
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || text(header::CONTENT_LENGTH).is_some_and(|n| n.trim() != "0");
        let json = content_type.is_some_and(is_json);
        if (has_body || content_type.is_some()) && !json {
            return Some(error_json(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type must be application/json, got {:?}",
                    content_type.unwrap_or("nothing")
                ),
            ));
        }
    }
    None
}

/// `application/json`, with or without parameters (`; charset=utf-8`), in any case.
fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The middleware: refuses, with a JSON error naming the header, a request for a host this
/// service does not answer for (421), from a web origin it does not trust (403), or a write
/// whose body is not JSON (415). Needs the service's [`AccessSettings`] as app data.
pub async fn guard<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let refused = req
        .app_data::<web::Data<AccessSettings>>()
        .and_then(|access| refusal(access, req.method(), req.headers()));
    match refused {
        Some(response) => Ok(req.into_response(response).map_into_right_body()),
        None => next.call(req).await.map(|r| r.map_into_left_body()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::{TestRequest, call_service, init_service, read_body};
    use actix_web::{App, middleware::from_fn};

    fn access() -> AccessSettings {
        AccessSettings::parse("127.0.0.1", "mall.example", "http://127.0.0.1:8081").unwrap()
    }

    #[test]
    fn hosts_are_the_loopback_names_the_bind_address_and_the_list() {
        let a = AccessSettings::parse("10.0.0.5", "Mall.Example, ", "").unwrap();
        for ok in [
            "localhost:8081",
            "127.0.0.1",
            "[::1]:8081",
            "10.0.0.5:8082",
            "MALL.example:80",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example:8081",
            "127.0.0.2",
            "localhost.evil.example",
            "",
        ] {
            assert!(!a.host_allowed(refused), "{refused}");
        }
        let wildcard = AccessSettings::parse("0.0.0.0", "", "").unwrap();
        assert!(!wildcard.host_allowed("0.0.0.0:8081"));
        let twice = AccessSettings::parse("127.0.0.1", "localhost", "").unwrap();
        assert_eq!(twice.allowed_hosts, LOOPBACK_HOSTS);
        let v6 = AccessSettings::parse("::", "::2", "").unwrap();
        assert!(v6.host_allowed("[::2]:1") && !v6.host_allowed("[::]:1"));
    }

    #[test]
    fn origins_are_the_own_one_and_the_list_never_a_wildcard() {
        let a = access();
        assert!(a.origin_allowed("http://127.0.0.1:8081", Some("127.0.0.1:8085")));
        assert!(a.origin_allowed("http://localhost:8085", Some("localhost:8085")));
        assert!(!a.origin_allowed("http://evil.example", Some("127.0.0.1:8085")));
        assert!(!a.origin_allowed("null", Some("127.0.0.1:8085")));
        assert!(!a.origin_allowed("http://localhost:8081", None));
        let default = AccessSettings::parse("127.0.0.1", "", DEFAULT_CORS_ORIGINS).unwrap();
        assert_eq!(
            default.cors_origins,
            ["http://127.0.0.1:8081", "http://localhost:8081"]
        );
        for bad in ["*", "http://*.example", "evil.example", "http://a/b"] {
            let e = AccessSettings::parse("127.0.0.1", "", bad).unwrap_err();
            assert!(e.to_string().contains("CORS_ORIGINS"), "{e}");
        }
    }

    async fn answer(req: TestRequest) -> (u16, String, Option<String>) {
        let app = init_service(
            App::new()
                .wrap(access().cors())
                .wrap(from_fn(guard))
                .app_data(web::Data::new(access()))
                .route("/orders", web::get().to(HttpResponse::Ok))
                .route("/orders", web::post().to(HttpResponse::Created)),
        )
        .await;
        let response = call_service(&app, req.to_request()).await;
        let status = response.status().as_u16();
        let allow = response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = String::from_utf8_lossy(&read_body(response).await).into_owned();
        (status, body, allow)
    }

    #[actix_web::test]
    async fn a_foreign_origin_is_refused_with_json_naming_the_header() {
        let preflight = TestRequest::default()
            .method(Method::OPTIONS)
            .uri("/orders")
            .insert_header(("Host", "127.0.0.1:8081"))
            .insert_header(("Origin", "http://evil.example"))
            .insert_header(("Access-Control-Request-Method", "POST"));
        let (status, body, allow) = answer(preflight).await;
        assert_eq!((status, allow), (403, None));
        assert!(
            body.contains("\"error\"") && body.contains("Origin"),
            "{body}"
        );
        let read = TestRequest::get()
            .uri("/orders")
            .insert_header(("Host", "127.0.0.1:8085"))
            .insert_header(("Origin", "http://evil.example"));
        assert_eq!(answer(read).await.0, 403);
        let listed = TestRequest::get()
            .uri("/orders")
            .insert_header(("Host", "127.0.0.1:8085"))
            .insert_header(("Origin", "http://127.0.0.1:8081"));
        let (status, _, allow) = answer(listed).await;
        assert_eq!(status, 200);
        assert_eq!(allow.as_deref(), Some("http://127.0.0.1:8081"));
    }

    #[actix_web::test]
    async fn a_foreign_host_is_refused_with_421() {
        let rebound = TestRequest::get()
            .uri("/orders")
            .insert_header(("Host", "evil.example:8081"));
        let (status, body, _) = answer(rebound).await;
        assert_eq!(status, 421);
        assert!(
            body.contains("Host") && body.contains("ALLOWED_HOSTS"),
            "{body}"
        );
        let listed = TestRequest::get()
            .uri("/orders")
            .insert_header(("Host", "mall.example"));
        assert_eq!(answer(listed).await.0, 200);
    }

    #[actix_web::test]
    async fn writes_must_be_json() {
        let post = |content_type: Option<&str>| {
            let mut req = TestRequest::post()
                .uri("/orders")
                .insert_header(("Host", "localhost:8081"))
                .set_payload("productId=1");
            if let Some(t) = content_type {
                req = req.insert_header(("Content-Type", t));
            }
            req
        };
        for refused in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            None,
        ] {
            let (status, body, _) = answer(post(refused)).await;
            assert_eq!(status, 415, "{refused:?}");
            assert!(body.contains("Content-Type"), "{body}");
        }
        assert_eq!(answer(post(Some("application/json"))).await.0, 201);
        assert_eq!(
            answer(post(Some("Application/JSON; charset=utf-8")))
                .await
                .0,
            201
        );
        let empty = TestRequest::post()
            .uri("/orders")
            .insert_header(("Host", "localhost:8081"));
        assert_eq!(
            answer(empty).await.0,
            201,
            "a write with no body needs no type"
        );
    }
}
