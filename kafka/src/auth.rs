//! Who may do what: bearer tokens with a role — customer (place orders, see and cancel their
//! own), courier (see deliveries, complete or cancel them), admin (everything). Tokens come
//! from `MALL_TOKENS` or the file `MALL_TOKENS_FILE`, entries `role:name:token` (a customer's
//! name is its `customerId`); only their SHA-256 is kept, and no token is ever logged or put in
//! an error message.
//!
//! With no token configured every request is served, as the seed lab expects; that is allowed
//! only while the service listens on loopback ([`Tokens::check_exposure`]). With tokens, every
//! request but `/health`, `/metrics` and the dashboard's page needs `Authorization: Bearer …`:
//! 401 without a valid one, 403 for a role the route does not admit. The route table is one
//! for all three services ([`required`]); whether an order is the customer's own is checked
//! by orders' handlers ([`Principal::customer`]).

use crate::http::error_json;
use crate::settings::ConfigError;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, web};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Places orders, sees and cancels their own; reads the catalog.
    Customer,
    /// Sees deliveries, completes or cancels them.
    Courier,
    /// Everything: catalog, stock, every order and delivery, dead letters.
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "courier" => Some(Role::Courier),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The caller a valid token names; in the request's extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's role.
    pub role: Role,
    /// Its name: the `customerId` for a customer.
    pub name: String,
}

impl Principal {
    /// The customer id a request is confined to: `Some` for a customer's token, `None` for
    /// admin, courier or a mall without tokens.
    pub fn customer(who: Option<&Principal>) -> Option<&str> {
        who.filter(|p| p.role == Role::Customer)
            .map(|p| p.name.as_str())
    }
}

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// The configured tokens, by the hex SHA-256 of the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    by_hash: HashMap<String, Principal>,
}

fn sha256(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

impl Tokens {
    /// Reads `MALL_TOKENS` (entries separated by commas or new lines) and the file named by
    /// `MALL_TOKENS_FILE` (one entry per line, `#` comments).
    pub fn from_env() -> Result<Tokens, ConfigError> {
        let mut text = std::env::var("MALL_TOKENS").unwrap_or_default();
        let mut source = "MALL_TOKENS";
        if let Ok(path) = std::env::var("MALL_TOKENS_FILE")
            && !path.trim().is_empty()
        {
            let file = std::fs::read_to_string(path.trim()).map_err(|e| ConfigError {
                name: "MALL_TOKENS_FILE".into(),
                value: path.clone(),
                reason: format!("cannot be read: {e}"),
            })?;
            text.push('\n');
            text.push_str(&file);
            source = "MALL_TOKENS / MALL_TOKENS_FILE";
        }
        Tokens::parse(source, &text)
    }

    /// Parses `role:name:token` entries; an error names `variable` and the entry's number,
    /// never its text.
    pub fn parse(variable: &str, text: &str) -> Result<Tokens, ConfigError> {
        let mut by_hash = HashMap::new();
        let entries = text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (n, entry) in entries.enumerate() {
            let refuse = |reason: &str| ConfigError {
                name: variable.into(),
                value: format!("entry {}", n + 1),
                reason: reason.into(),
            };
            let mut parts = entry.splitn(3, ':');
            let (role, name, token) = match (parts.next(), parts.next(), parts.next()) {
                (Some(r), Some(n), Some(t)) => (r.trim(), n.trim(), t.trim()),
                _ => return Err(refuse("expected role:name:token")),
            };
            let role = Role::parse(role)
                .ok_or_else(|| refuse("the role must be customer, courier or admin"))?;
            if name.is_empty() {
                return Err(refuse(
                    "the name is empty (a customer's name is its customerId)",
                ));
            }
            if token.len() < MIN_TOKEN_LEN || token.contains(char::is_whitespace) {
                return Err(refuse(&format!(
                    "the token must be at least {MIN_TOKEN_LEN} characters without spaces \
                     (openssl rand -hex 24)"
                )));
            }
            let principal = Principal {
                role,
                name: name.to_owned(),
            };
            if by_hash.insert(sha256(token), principal).is_some() {
                return Err(refuse("the same token is given twice"));
            }
        }
        Ok(Tokens { by_hash })
    }

    /// True when no token is configured: every request is served.
    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Refuses to serve an address other than loopback without tokens, naming the variable.
    pub fn check_exposure(&self, host: &str) -> Result<(), ConfigError> {
        let loopback = matches!(host.trim(), "localhost" | "::1" | "[::1]")
            || host
                .trim()
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if self.is_open() && !loopback {
            return Err(ConfigError {
                name: "MALL_TOKENS".into(),
                value: String::new(),
                reason: format!(
                    "HOST={host} is reachable from other machines, and without tokens anyone \
                     there could use the whole API: set MALL_TOKENS or MALL_TOKENS_FILE \
                     (role:name:token entries), or bind HOST=127.0.0.1"
                ),
            });
        }
        Ok(())
    }

    /// How many tokens per role, for the start-up log (never the tokens).
    pub fn summary(&self) -> String {
        if self.is_open() {
            return "no MALL_TOKENS: every request is served without a token (allowed only on \
                    loopback)"
                .into();
        }
        let count = |role| self.by_hash.values().filter(|p| p.role == role).count();
        format!(
            "bearer tokens required: {} customer, {} courier, {} admin",
            count(Role::Customer),
            count(Role::Courier),
            count(Role::Admin)
        )
    }

    fn principal(&self, authorization: Option<&HeaderValue>) -> Option<&Principal> {
        let token = authorization?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim();
        self.by_hash.get(&sha256(token))
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// Nothing: `/health`, `/metrics`, the dashboard's page and assets.
    Nobody,
    /// A token of one of these roles (admin always qualifies).
    Roles(&'static [Role]),
}

/// The route table of the three services: who may call `method path`. What is not listed is
/// for admins.
pub fn required(method: &Method, path: &str) -> Required {
    const CUSTOMER: &[Role] = &[Role::Customer];
    const COURIER: &[Role] = &[Role::Courier];
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = *method == Method::GET || *method == Method::HEAD;
    match (segments.as_slice(), get) {
        ([""] | ["health"] | ["metrics"] | ["dashboard", _], true) => Required::Nobody,
        (["orders"], _) | (["orders", _], _) | (["orders", _, "events"], true) => {
            Required::Roles(CUSTOMER)
        }
        (["products"] | ["products", _], true) => Required::Roles(CUSTOMER),
        (["deliveries"], true) | (["deliveries", _], _) => Required::Roles(COURIER),
        _ => Required::Roles(&[]),
    }
}

/// Why a request is refused, if it is.
fn refusal(
    tokens: &Tokens,
    method: &Method,
    path: &str,
    authorization: Option<&HeaderValue>,
) -> Result<Option<Principal>, (StatusCode, String)> {
    let needed = required(method, path);
    if tokens.is_open() || needed == Required::Nobody {
        return Ok(None);
    }
    let Some(who) = tokens.principal(authorization) else {
        let why = if authorization.is_some() {
            "the Authorization token is not valid"
        } else {
            "this needs Authorization: Bearer <token>"
        };
        return Err((StatusCode::UNAUTHORIZED, why.into()));
    };
    match needed {
        Required::Roles(roles) if who.role == Role::Admin || roles.contains(&who.role) => {
            Ok(Some(who.clone()))
        }
        _ => Err((
            StatusCode::FORBIDDEN,
            format!("a {:?} token may not {method} {path}", who.role).to_lowercase(),
        )),
    }
}

/// The one path that takes its token as `?access_token=`: orders' server-sent events.
const STREAM_PATH: &str = "/events/stream";

/// The token of a `?access_token=` query; other parameters are the handler's.
#[derive(serde::Deserialize)]
struct StreamToken {
    access_token: Option<String>,
}

/// The middleware: with tokens configured, a request needs a valid bearer token whose role the
/// route admits (401 / 403 with a JSON error); the [`Principal`] goes into the request's
/// extensions. Needs the service's [`Tokens`] as app data.
pub async fn authenticate<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let Some(tokens) = req.app_data::<web::Data<Tokens>>().cloned() else {
        return next.call(req).await.map(|r| r.map_into_left_body());
    };
    // EventSource cannot send headers: the event stream alone takes `?access_token=`
    // (the request log shows paths without their query).
    let from_query = (req.path() == STREAM_PATH)
        .then(|| web::Query::<StreamToken>::from_query(req.query_string()).ok())
        .flatten()
        .and_then(|q| q.access_token.clone())
        .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .or(from_query.as_ref());
    let decided = refusal(&tokens, req.method(), req.path(), authorization);
    match decided {
        Ok(who) => {
            if let Some(who) = who {
                req.extensions_mut().insert(who);
            }
            next.call(req).await.map(|r| r.map_into_left_body())
        }
        Err((status, message)) => {
            let mut response = error_json(status, message);
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Ok(req.into_response(response).map_into_right_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRIES: &str = "customer:ann@12st.mall:ann-token-0123456789,\
                           courier:bob:bob-token-0123456789\n\
                           # the operator\n admin:ops:ops-token-0123456789";

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn entries_parse_and_errors_name_the_entry_never_the_token() {
        let tokens = Tokens::parse("MALL_TOKENS", ENTRIES).unwrap();
        assert_eq!(tokens.by_hash.len(), 3);
        assert!(tokens.summary().contains("1 customer, 1 courier, 1 admin"));
        assert!(!tokens.by_hash.keys().any(|k| k.contains("token")));
        for bad in [
            "customer:ann",
            "boss:x:long-enough-token-123",
            "admin::long-enough-token-123",
            "admin:ops:short",
        ] {
            let e = Tokens::parse("MALL_TOKENS", bad).unwrap_err().to_string();
            assert!(e.contains("MALL_TOKENS") && e.contains("entry 1"), "{e}");
            assert!(!e.contains("long-enough") && !e.contains("short"), "{e}");
        }
        let twice = "admin:a:same-token-0123456789,admin:b:same-token-0123456789";
        assert!(Tokens::parse("MALL_TOKENS", twice).is_err());
    }

    #[test]
    fn without_tokens_only_loopback_may_be_served() {
        let open = Tokens::default();
        for loopback in ["127.0.0.1", "::1", "localhost", "127.0.0.2"] {
            assert!(open.check_exposure(loopback).is_ok(), "{loopback}");
        }
        let e = open.check_exposure("0.0.0.0").unwrap_err().to_string();
        assert!(e.contains("MALL_TOKENS"), "{e}");
        let closed = Tokens::parse("MALL_TOKENS", ENTRIES).unwrap();
        assert!(closed.check_exposure("0.0.0.0").is_ok());
    }

    #[test]
    fn the_role_matrix() {
        let tokens = Tokens::parse("MALL_TOKENS", ENTRIES).unwrap();
        let status = |method: Method, path: &str, token: Option<&str>| {
            let header = token.map(bearer);
            match refusal(&tokens, &method, path, header.as_ref()) {
                Ok(_) => 200,
                Err((status, _)) => status.as_u16(),
            }
        };
        let (ann, bob, ops) = (
            Some("ann-token-0123456789"),
            Some("bob-token-0123456789"),
            Some("ops-token-0123456789"),
        );
        assert_eq!(status(Method::GET, "/health", None), 200);
        assert_eq!(status(Method::GET, "/", None), 200);
        assert_eq!(status(Method::GET, "/orders", None), 401);
        assert_eq!(
            status(Method::GET, "/orders", Some("not-a-token-at-all")),
            401
        );
        assert_eq!(status(Method::POST, "/orders", ann), 200);
        assert_eq!(status(Method::PATCH, "/orders/3", ann), 200);
        assert_eq!(status(Method::GET, "/orders/3/events", ann), 200);
        assert_eq!(status(Method::GET, "/products/1", ann), 200);
        assert_eq!(status(Method::PATCH, "/products/1", ann), 403);
        assert_eq!(status(Method::PATCH, "/deliveries/1", ann), 403);
        assert_eq!(status(Method::GET, "/dead-letters", ann), 403);
        assert_eq!(status(Method::GET, "/events/stream", ann), 403);
        assert_eq!(status(Method::PATCH, "/deliveries/1", bob), 200);
        assert_eq!(status(Method::GET, "/deliveries", bob), 200);
        assert_eq!(status(Method::POST, "/orders", bob), 403);
        assert_eq!(status(Method::POST, "/products", bob), 403);
        for (method, path) in [
            (Method::POST, "/products"),
            (Method::PATCH, "/products/1"),
            (Method::GET, "/dead-letters"),
            (Method::GET, "/reservations"),
            (Method::PATCH, "/orders/1"),
            (Method::PATCH, "/deliveries/1"),
        ] {
            assert_eq!(status(method, path, ops), 200, "{path}");
        }
        let open = Tokens::default();
        assert!(matches!(
            refusal(&open, &Method::POST, "/products", None),
            Ok(None)
        ));
    }
}
