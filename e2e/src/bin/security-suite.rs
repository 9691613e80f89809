//! Who may use the mall (`scripts/test.sh` runs it): a fresh broker and the three service
//! binaries on free ports, then, over HTTP and in headless Chromium, what a stranger tries:
//! - requests naming a foreign `Origin` or `Host`, or writing with a body that is not JSON, are
//!   refused with JSON naming the header, and change nothing (REST and the topic agree);
//! - a page on another origin (`evil.example`, resolved to 127.0.0.1 by Chromium itself) can
//!   neither read the orders, nor cancel one, nor place one with a form-like post; the same page
//!   re-pointing its own name at the mall (DNS rebinding) gets 421;
//! - a client retrying `POST /orders` with one `Idempotency-Key` gets one order, also when the
//!   first answer was lost; the same key with another body gets 422; a keyed
//!   `PATCH /products/{id}` (a `stockDelta`) and `PATCH /deliveries/{id}` retried act once;
//! - one client address holding `HTTP_MAX_CONNECTIONS_PER_ADDRESS` (256) connections gets 429
//!   on one more, and is served again once one closes.
//!
//! Prints one line per scenario and `N passed, N failed` last; keeps the run directory (logs)
//! when one failed.
//!
//! Usage: `security-suite --bin-dir target/debug --kafka .tools/kafka-4.1.1/libs
//!         [--postgres URL] [--chromium /usr/bin/chromium] [--chromedriver /usr/bin/chromedriver]`
//! (`--postgres`: each service gets a fresh database on that server)

use e2e::broker::BrokerKind;
use e2e::browser::{Chromedriver, open_browser};
use e2e::stack::{Stack, StackOptions, argument, free_port};
use e2e::{Check, Mall, eventually, read_topic};
use serde_json::{Value, json};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a saga may take to end here.
const SAGA: Duration = Duration::from_secs(30);

/// A raw request: status and body text, whatever the body is.
async fn send(
    request: reqwest::RequestBuilder,
) -> Check<(u16, String, reqwest::header::HeaderMap)> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.map_err(|e| e.to_string())?;
    Ok((status, text, headers))
}

/// Insists on a JSON error body with `status` whose message names `header`.
fn refused(
    what: &str,
    got: (u16, String, reqwest::header::HeaderMap),
    status: u16,
    header: &str,
) -> Check {
    let (code, text, headers) = got;
    let error = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned));
    match error {
        Some(message) if code == status && message.contains(header) => {
            if headers.contains_key("access-control-allow-origin") {
                return Err(format!(
                    "{what}: refused but still allows an origin: {headers:?}"
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "{what}: expected {status} with a JSON error naming {header}, got {code} {text:?}"
        )),
    }
}

/// The orders of `customer`, read through REST.
async fn orders_of(m: &Mall, customer: &str) -> Check<Vec<Value>> {
    let url = format!("{}/orders?customerId={customer}", m.orders);
    let list = m.expect("GET", &url, None, 200).await?;
    Ok(list.as_array().cloned().unwrap_or_default())
}

/// The OrderPlaced events on the topic for `customer`.
async fn placed_on_topic(m: &Mall, customer: &str) -> Check<usize> {
    Ok(read_topic(&m.brokers, &m.topic)
        .await?
        .iter()
        .filter(|e| e.value["eventType"] == "OrderPlaced" && e.value["customerId"] == customer)
        .count())
}

/// Refused requests created nothing for `customer`, in REST or on the topic. A valid order
/// placed after them and seen completed is the sign they were all handled; `what` names them.
async fn nothing_created_for(m: &Mall, customer: &str, what: &str) -> Check {
    let marker = m.place_order(1, 1).await?;
    m.wait_order_state(marker, "OrderCompleted").await?;
    let (kept, events) = (
        orders_of(m, customer).await?,
        placed_on_topic(m, customer).await?,
    );
    if !kept.is_empty() || events != 0 {
        return Err(format!(
            "{what} left {} orders and {events} OrderPlaced",
            kept.len()
        ));
    }
    Ok(())
}

/// A foreign `Origin` (preflight, read and write), a foreign `Host`, and non-JSON writes are
/// refused with JSON naming the header; nothing is created, here or on the topic.
async fn foreign_origins_hosts_and_media_types_are_refused(m: &Mall) -> Check {
    let http = reqwest::Client::new();
    let orders = format!("{}/orders", m.orders);
    let evil = "http://evil.example";
    let preflight = http
        .request(reqwest::Method::OPTIONS, format!("{orders}/1"))
        .header("Origin", evil)
        .header("Access-Control-Request-Method", "PATCH");
    refused(
        "preflight from a foreign origin",
        send(preflight).await?,
        403,
        "Origin",
    )?;
    let read = http.get(&orders).header("Origin", evil);
    refused(
        "GET /orders from a foreign origin",
        send(read).await?,
        403,
        "Origin",
    )?;
    for service in [&m.products, &m.delivery] {
        let read = http.get(format!("{service}/health")).header("Origin", evil);
        refused(
            "a foreign origin on products/delivery",
            send(read).await?,
            403,
            "Origin",
        )?;
    }
    let rebound = http.get(&orders).header("Host", "evil.example");
    refused("Host: evil.example", send(rebound).await?, 421, "Host")?;
    let customer = "stranger@evil.example";
    let body = json!({"productId": 1, "quantity": 1, "customerId": customer}).to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let post = http
            .post(&orders)
            .header("Content-Type", content_type)
            .body(body.clone());
        refused(content_type, send(post).await?, 415, "Content-Type")?;
    }
    let cross_site = http
        .post(&orders)
        .header("Origin", evil)
        .header("Content-Type", "application/json")
        .body(body);
    refused(
        "a JSON POST from a foreign origin",
        send(cross_site).await?,
        403,
        "Origin",
    )?;
    // The mall's own dashboard origin is still served, with CORS for exactly that origin.
    let dashboard = http
        .get(format!("{}/products", m.products))
        .header("Origin", &m.orders);
    let (status, _, headers) = send(dashboard).await?;
    let allowed = headers
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok());
    if status != 200 || allowed != Some(m.orders.as_str()) {
        return Err(format!(
            "the dashboard's origin on products: {status}, allows {allowed:?}"
        ));
    }
    nothing_created_for(m, customer, "refused posts").await
}

/// Serves `page` for every request on a free port of 127.0.0.1, until the task is aborted.
async fn serve_page(page: String) -> Check<(u16, tokio::task::JoinHandle<()>)> {
    let port = free_port().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((port, task))
}

/// What the stranger's page tries, in the browser; each attempt reports what it saw.
const STRANGER_SCRIPT: &str = r#"
const [orders, id, customer, done] = arguments;
const out = {};
const attempt = async (name, f) => {
  try { out[name] = await f(); } catch (e) { out[name] = 'blocked: ' + e.name; }
};
(async () => {
  await attempt('read', async () => {
    const r = await fetch(orders + '/orders');
    return 'read ' + r.status + ' ' + (await r.text()).slice(0, 120);
  });
  await attempt('cancel', async () => {
    const r = await fetch(orders + '/orders/' + id, {
      method: 'PATCH', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({state: 'OrderCancelled'})});
    return 'cancel ' + r.status;
  });
  await attempt('form', async () => {
    const r = await fetch(orders + '/orders', {
      method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'},
      body: JSON.stringify({productId: 1, quantity: 1, customerId: customer})});
    return 'sent ' + r.type;
  });
  done(out);
})();
"#;

/// A page on `evil.example` tries to read the orders, cancel one and post a form-like order,
/// then to reach orders under its own name (DNS rebinding): all fail, and REST and the topic
/// show nothing changed.
async fn a_page_elsewhere_cannot_read_or_act(
    m: &Mall,
    dir: &Path,
    chromium: &Path,
    chromedriver: &Path,
) -> Check {
    let order = m.place_order(1, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let (page_port, server) =
        serve_page("<html><body><h1>a page elsewhere</h1></body></html>".into()).await?;
    let driver = Chromedriver::start(chromedriver, dir).await?;
    // Chromium resolves evil.example to this machine itself: no DNS server needed.
    let client = open_browser(
        &driver,
        chromium,
        &["--host-resolver-rules=MAP evil.example 127.0.0.1"],
    )
    .await?;
    let orders_port = m.orders.rsplit(':').next().unwrap_or_default().to_owned();
    let customer = "form@evil.example";
    let seen = async {
        client
            .goto(&format!("http://evil.example:{page_port}/"))
            .await
            .map_err(|e| format!("opening the page elsewhere: {e}"))?;
        let seen = client
            .execute_async(
                STRANGER_SCRIPT,
                vec![json!(m.orders), json!(order), json!(customer)],
            )
            .await
            .map_err(|e| format!("running the page's script: {e}"))?;
        // DNS rebinding: the stranger's name, now resolving to this machine, on orders' port.
        // The browser sees one origin; only the Host header tells.
        let rebound = format!("http://evil.example:{orders_port}/orders");
        client
            .goto(&rebound)
            .await
            .map_err(|e| format!("opening {rebound}: {e}"))?;
        let shown = client
            .find(fantoccini::Locator::Css("body"))
            .await
            .map_err(|e| format!("{rebound}: {e}"))?
            .text()
            .await
            .map_err(|e| format!("{rebound}: {e}"))?;
        Ok::<_, String>((seen, shown))
    }
    .await;
    let _ = client.close().await;
    drop(driver);
    server.abort();
    let (seen, rebound) = seen?;
    println!("    the page saw: {seen}; under the rebound name: {rebound}");
    let text = |name: &str| seen[name].as_str().unwrap_or_default().to_owned();
    if !text("read").starts_with("blocked") {
        return Err(format!("the page read the orders: {}", text("read")));
    }
    if !text("cancel").starts_with("blocked") {
        return Err(format!(
            "the page's cancel went through: {}",
            text("cancel")
        ));
    }
    if !rebound.contains("\"error\"") || !rebound.contains("Host") || rebound.contains("customerId")
    {
        return Err(format!("orders answered under the rebound name: {rebound}"));
    }
    let state = m.order(order).await?;
    if state["state"] != "OrderCompleted" || state["cancelRequested"] == true {
        return Err(format!("the page changed order {order}: {state}"));
    }
    nothing_created_for(m, customer, "the form post").await?;
    let cancels = read_topic(&m.brokers, &m.topic)
        .await?
        .iter()
        .filter(|e| e.value["orderId"] == order && e.value["eventType"] != "OrderPlaced")
        .filter(|e| {
            e.value["eventType"]
                .as_str()
                .is_some_and(|t| t.contains("Cancel"))
        })
        .count();
    if cancels != 0 {
        return Err(format!(
            "{cancels} cancel events for order {order} on the topic"
        ));
    }
    Ok(())
}

/// `POST /orders` with an `Idempotency-Key` over a raw connection whose answer is never read:
/// the connection is dropped once the order shows in REST, as when a client times out.
async fn post_and_lose_the_answer(m: &Mall, key: &str, body: &str, customer: &str) -> Check {
    let address = m.orders.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    let request = format!(
        "POST /orders HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Idempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    eventually("the first attempt's order shows", SAGA, || async {
        match orders_of(m, customer).await?.len() {
            0 => Err("no order yet".to_string()),
            _ => Ok(()),
        }
    })
    .await?;
    drop(socket); // the answer is lost
    Ok(())
}

/// A client that lost the answer to its `POST /orders` retries with the same key: it gets the
/// first answer (the same order), once more and concurrently too; one order exists and one
/// OrderPlaced is on the topic. The same key with another body is refused with 422. A keyed
/// cancel retried gets its first answer, not 409, and one cancel reaches the topic.
async fn a_retried_post_gives_one_order(m: &Mall) -> Check {
    let http = reqwest::Client::new();
    let customer = format!("retry-{}@12st.mall", std::process::id());
    let key = format!("order-{}", std::process::id());
    let body = json!({"productId": 1, "quantity": 1, "customerId": customer}).to_string();
    post_and_lose_the_answer(m, &key, &body, &customer).await?;
    let retry = || {
        http.post(format!("{}/orders", m.orders))
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", &key)
            .body(body.clone())
    };
    let mut answers = vec![send(retry()).await?];
    let mut concurrent = tokio::task::JoinSet::new();
    for _ in 0..5 {
        concurrent.spawn(send(retry()));
    }
    while let Some(answer) = concurrent.join_next().await {
        answers.push(answer.map_err(|e| e.to_string())??);
    }
    let orders = orders_of(m, &customer).await?;
    let [order] = orders.as_slice() else {
        let ids: Vec<&Value> = orders.iter().map(|o| &o["id"]).collect();
        return Err(format!("{} orders for one key: ids {ids:?}", orders.len()));
    };
    for (status, text, headers) in &answers {
        let answered: Value = serde_json::from_str(text).unwrap_or_default();
        if *status != 201 || answered["id"] != order["id"] {
            return Err(format!("a retry got {status} {text}, the order is {order}"));
        }
        if headers.get("idempotent-replayed").is_none() {
            return Err(format!(
                "a retry's answer is not marked replayed: {headers:?}"
            ));
        }
    }
    let other = json!({"productId": 1, "quantity": 2, "customerId": customer}).to_string();
    let misuse = retry().body(other);
    refused(
        "the same key with another body",
        send(misuse).await?,
        422,
        "Idempotency-Key",
    )?;
    let id = order["id"].as_i64().unwrap_or_default();
    m.wait_order_state(id, "OrderCompleted").await?;
    let cancel = || {
        http.patch(format!("{}/orders/{id}", m.orders))
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", format!("cancel-{key}"))
            .body(r#"{"state":"OrderCancelled"}"#)
    };
    let (first, _, _) = send(cancel()).await?;
    let (again, text, _) = send(cancel()).await?;
    if first != 202 || again != 202 {
        return Err(format!("a keyed cancel: {first}, its retry {again} {text}"));
    }
    m.wait_order_state(id, "OrderCancelled").await?;
    let events = read_topic(&m.brokers, &m.topic).await?;
    let count = |t: &str| {
        events
            .iter()
            .filter(|e| e.value["eventType"] == t && e.value["orderId"] == id)
            .count()
    };
    let placed = events
        .iter()
        .filter(|e| e.value["eventType"] == "OrderPlaced" && e.value["customerId"] == customer)
        .count();
    if placed != 1 || count("OrderCancelRequested") != 1 || count("OrderCancelled") != 1 {
        return Err(format!(
            "on the topic: {placed} OrderPlaced, {} OrderCancelRequested, {} OrderCancelled",
            count("OrderCancelRequested"),
            count("OrderCancelled")
        ));
    }
    Ok(())
}

/// Sends `request` (repeatedly, concurrently) with `key`: every answer must be `status`, the
/// retries' marked replayed and all with the first answer's body. Returns that body.
async fn retried_answers(
    what: &str,
    request: impl Fn() -> reqwest::RequestBuilder,
    status: u16,
) -> Check<Value> {
    let (first, text, _) = send(request()).await?;
    if first != status {
        return Err(format!("{what}: the first attempt got {first} {text}"));
    }
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("{what}: {e}"))?;
    let mut retries = tokio::task::JoinSet::new();
    for _ in 0..4 {
        retries.spawn(send(request()));
    }
    while let Some(answer) = retries.join_next().await {
        let (code, text, headers) = answer.map_err(|e| e.to_string())??;
        let again: Value = serde_json::from_str(&text).unwrap_or_default();
        if code != status || again != body || headers.get("idempotent-replayed").is_none() {
            return Err(format!(
                "{what}: a retry got {code} {text} (replayed: {:?}), the first {body}",
                headers.get("idempotent-replayed")
            ));
        }
    }
    Ok(body)
}

/// A keyed `PATCH /products/{id}` adding stock, retried, adds it once (one ProductChanged for
/// it on the topic); a keyed courier completion retried is answered 200 as the first time
/// (not 409) and one DeliveryCompleted reaches the topic; each key with another body is 422.
async fn retried_patches_act_once(m: &Mall) -> Check {
    let http = reqwest::Client::new();
    let run = std::process::id();
    let product = m.create_product(&format!("keyed-{run}"), 10).await?;
    let product_url = format!("{}/products/{product}", m.products);
    let restock = |body: &'static str| {
        http.patch(&product_url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", format!("restock-{run}"))
            .body(body)
    };
    retried_answers("a keyed restock", || restock(r#"{"stockDelta":5}"#), 200).await?;
    refused(
        "a restock key with another body",
        send(restock(r#"{"stockDelta":6}"#)).await?,
        422,
        "Idempotency-Key",
    )?;
    let (stock, _) = m.stock(product).await?;
    if stock != 15 {
        return Err(format!(
            "the retried restock left the stock at {stock}, not 15"
        ));
    }
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let delivery = m.wait_delivery_confirmed(order).await?;
    let delivery_url = format!("{}/deliveries/{}", m.delivery, delivery["id"]);
    let complete = |state: &str| {
        http.patch(&delivery_url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", format!("complete-{run}"))
            .body(json!({ "deliveryState": state }).to_string())
    };
    retried_answers(
        "a keyed delivery completion",
        || complete("DeliveryCompleted"),
        200,
    )
    .await?;
    refused(
        "a completion key with another body",
        send(complete("DeliveryCancelled")).await?,
        422,
        "Idempotency-Key",
    )?;
    m.wait_delivery_state(order, "DeliveryCompleted").await?;
    let events = read_topic(&m.brokers, &m.topic).await?;
    // Its creation (stock 10), the restock (15) once, the order's reservation (14).
    let changed: Vec<&Value> = events
        .iter()
        .filter(|e| e.value["eventType"] == "ProductChanged" && e.value["productId"] == product)
        .map(|e| &e.value["productStock"])
        .collect();
    let completed = events
        .iter()
        .filter(|e| e.value["eventType"] == "DeliveryCompleted" && e.value["orderId"] == order)
        .count();
    if changed != [&json!(10), &json!(15), &json!(14)] || completed != 1 {
        return Err(format!(
            "on the topic: ProductChanged with stocks {changed:?}, {completed} DeliveryCompleted"
        ));
    }
    Ok(())
}

/// A connection to `base` that has been served one `GET {path}` (so the service has counted
/// it); returns the status and the still open connection.
async fn served_connection(base: &str, path: &str) -> Check<(u16, String, tokio::net::TcpStream)> {
    let address = base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The head is enough for a kept-alive answer; a refused one is closed by the service.
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(SAGA, socket.read(&mut buf))
            .await
            .map_err(|_| format!("no answer to GET {path}"))?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, text, socket))
}

/// The default of `HTTP_MAX_CONNECTIONS_PER_ADDRESS`.
const CONNECTIONS_PER_ADDRESS: usize = 256;

/// 256 connections from 127.0.0.1 to delivery are served; one more is answered 429 with
/// `Retry-After` and `Connection: close`, naming the setting; once one of the 256 closes, a
/// new connection is served again.
async fn connections_per_address_are_capped(m: &Mall) -> Check {
    let path = "/deliveries?limit=1";
    let mut open = Vec::new();
    for n in 1..=CONNECTIONS_PER_ADDRESS {
        let (status, text, socket) = served_connection(&m.delivery, path).await?;
        if status != 200 {
            return Err(format!("connection {n} was answered {text:?}"));
        }
        open.push(socket);
    }
    let (status, head, mut over) = served_connection(&m.delivery, path).await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut rest)).await;
    let text = format!("{head}{}", String::from_utf8_lossy(&rest));
    let lower = text.to_ascii_lowercase();
    if status != 429
        || !lower.contains("retry-after:")
        || !lower.contains("connection: close")
        || !text.contains("HTTP_MAX_CONNECTIONS_PER_ADDRESS")
    {
        return Err(format!("connection 257 was answered {text:?}"));
    }
    drop(open.pop());
    eventually(
        "a connection is served again once one closed",
        SAGA,
        || async {
            match served_connection(&m.delivery, path).await? {
                (200, _, _) => Ok(()),
                (_, text, _) => Err(format!("answered {text:?}")),
            }
        },
    )
    .await
}

/// Slow uploads opened against orders, each sending its head and then a byte of its body at a
/// time; how many.
const SLOW_UPLOADS: usize = 40;
/// The longest an ordinary POST may take while they trickle: far below the trickle's length.
const ORDINARY_LIMIT: Duration = Duration::from_secs(3);

/// One slow upload: the head of a `POST /orders` with a 200-byte body, then one byte every
/// 250 ms for 12 s (a third of the body); returns the status it was answered with, if any.
async fn slow_upload(orders: String, started: tokio::sync::mpsc::Sender<()>) -> Check<Option<u16>> {
    let address = orders.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: 200\r\n\r\n{{"
    );
    socket
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let _ = started.send(()).await;
    for _ in 0..48 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if socket.write_all(b" ").await.is_err() {
            break; // the server gave up on it
        }
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    if read.is_err() && answer.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&answer);
    Ok(text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok()))
}

/// The slowest of `n` ordinary `POST /orders`, one after another; each must be 201.
async fn ordinary_posts(m: &Mall, n: usize) -> Check<Duration> {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let started = std::time::Instant::now();
        m.place_order(1, 1).await?;
        slowest = slowest.max(started.elapsed());
    }
    Ok(slowest)
}

/// 40 clients trickle their `POST /orders` bodies; ordinary POSTs beside them keep answering
/// quickly (the body is read before a request waits for a turn), and the trickling ones are
/// answered 408 once their body is overdue.
async fn slow_uploads_do_not_hold_the_writes(m: &Mall) -> Check {
    let before = ordinary_posts(m, 10).await?;
    let (started, mut heads) = tokio::sync::mpsc::channel(SLOW_UPLOADS);
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..SLOW_UPLOADS {
        uploads.spawn(slow_upload(m.orders.clone(), started.clone()));
    }
    drop(started);
    for _ in 0..SLOW_UPLOADS {
        heads.recv().await.ok_or("a slow upload did not start")?;
    }
    // Every head is with the server; their first bytes follow within 250 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = ordinary_posts(m, 10).await?;
    println!(
        "    slowest ordinary POST: {before:?} alone, {during:?} beside {SLOW_UPLOADS} slow uploads"
    );
    let mut answers = Vec::new();
    while let Some(answer) = uploads.join_next().await {
        answers.push(answer.map_err(|e| e.to_string())??);
    }
    if during > ORDINARY_LIMIT {
        return Err(format!(
            "an ordinary POST took {during:?} beside the slow uploads (alone: {before:?})"
        ));
    }
    let timed_out = answers.iter().filter(|a| **a == Some(408)).count();
    if timed_out != SLOW_UPLOADS {
        return Err(format!(
            "the slow uploads were answered {answers:?}, not 408 each"
        ));
    }
    Ok(())
}

/// Opens `GET /events/stream` on orders and reads the status line; the connection stays open
/// (the stream with it) while the returned socket lives.
async fn open_stream(orders: &str) -> Check<(u16, tokio::net::TcpStream)> {
    let address = orders.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    let request = format!("GET /events/stream HTTP/1.1\r\nHost: {address}\r\n\r\n");
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    tokio::time::timeout(SAGA, socket.read_exact(&mut head))
        .await
        .map_err(|_| "no answer to GET /events/stream".to_string())?
        .map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0);
    Ok((status, socket))
}

/// Orders keeps at most 64 event streams open: the 65th is refused with 503, and once one
/// ends a new one is served again.
async fn event_streams_are_bounded(m: &Mall) -> Check {
    let mut open = Vec::new();
    for n in 1..=64 {
        let (status, socket) = open_stream(&m.orders).await?;
        if status != 200 {
            return Err(format!("stream {n} was answered {status}"));
        }
        open.push(socket);
    }
    let (status, _) = open_stream(&m.orders).await?;
    if status != 503 {
        return Err(format!("the 65th stream was answered {status}, not 503"));
    }
    drop(open.pop());
    eventually("a stream is served again once one ended", SAGA, || async {
        match open_stream(&m.orders).await? {
            (200, _) => Ok(()),
            (status, _) => Err(format!("answered {status}")),
        }
    })
    .await
}

/// The tokens of the role-matrix stack: `role:name:token`.
const TOKENS: &str = "customer:ann@12st.mall:ann-token-0123456789,\
                      customer:bea@12st.mall:bea-token-0123456789,\
                      courier:carl:carl-token-0123456789,admin:ops:ops-token-0123456789";

/// A request with an optional bearer token; JSON body when given.
async fn as_role(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> Check<(u16, Value)> {
    let mut request = reqwest::Client::new().request(method.clone(), &url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let (status, text, _) = send(request).await?;
    let value = serde_json::from_str(&text)
        .map_err(|_| format!("{method} {url} → {status}, not JSON: {text:?}"))?;
    Ok((status, value))
}

/// With `MALL_TOKENS` set on every service: no token or a wrong one gets 401, each role gets
/// what its token admits and 403 for the rest (JSON errors), a customer sees and cancels only
/// their own orders, and a refused cancel leaves the order and the topic untouched. A service
/// bound beyond loopback without tokens refuses to start, naming `MALL_TOKENS`.
async fn the_role_matrix(setup: &Setup<'_>) -> Check {
    let (dir, bin_dir, broker) = (setup.dir, setup.bin_dir, setup.broker);
    let env = ["orders", "products", "delivery"]
        .into_iter()
        .map(|s| (s, "MALL_TOKENS".to_owned(), TOKENS.to_owned()))
        .collect();
    let dir = dir.join("roles");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut stack = Stack::start_with(&dir, bin_dir, broker, env)?;
    let result = match role_matrix_on(&stack, bin_dir).await {
        Ok(ids) => the_dashboard_asks_for_a_token(&stack.mall(), setup, &dir, ids).await,
        Err(e) => Err(e),
    }
    .and_then(|()| no_token_in_the_logs(&dir));
    stack.stop();
    result
}

/// No service wrote a token into its log (the dashboard's stream sends one in its query).
fn no_token_in_the_logs(dir: &Path) -> Check {
    for service in ["orders", "products", "delivery"] {
        let log = std::fs::read_to_string(dir.join(format!("{service}.log")))
            .map_err(|e| format!("{service}.log: {e}"))?;
        if log.contains("token-0123456789") {
            return Err(format!("{service}.log holds a token"));
        }
    }
    Ok(())
}

/// The matrix on a stack with tokens; returns ann's and bea's order ids.
async fn role_matrix_on(stack: &Stack, bin_dir: &Path) -> Check<(i64, i64)> {
    use reqwest::Method;
    let m = stack.mall();
    let (ann, bea, carl, ops) = (
        Some("ann-token-0123456789"),
        Some("bea-token-0123456789"),
        Some("carl-token-0123456789"),
        Some("ops-token-0123456789"),
    );
    eventually("the mall is healthy", SAGA, || m.wait_healthy()).await?;
    let expect = |what: &'static str, got: (u16, Value), status: u16| {
        if got.0 == status && (status < 400 || got.1["error"].is_string()) {
            Ok(got.1)
        } else {
            Err(format!(
                "{what}: expected {status}, got {} {}",
                got.0, got.1
            ))
        }
    };
    let orders = format!("{}/orders", m.orders);
    let order_of = |customer: &str| json!({"productId": 1, "quantity": 1, "customerId": customer});
    expect(
        "GET /orders without a token",
        as_role(Method::GET, orders.clone(), None, None).await?,
        401,
    )?;
    expect(
        "GET /orders with a wrong token",
        as_role(
            Method::GET,
            orders.clone(),
            Some("wrong-token-0123456789"),
            None,
        )
        .await?,
        401,
    )?;
    expect(
        "/health without a token",
        as_role(Method::GET, format!("{}/health", m.orders), None, None).await?,
        200,
    )?;
    // Admin: the catalog.
    let product = expect(
        "admin creates a product",
        as_role(
            Method::POST,
            format!("{}/products", m.products),
            ops,
            Some(json!({"name": "roles", "price": 100, "stock": 10})),
        )
        .await?,
        201,
    )?;
    let product_url = format!("{}/products/{}", m.products, product["id"]);
    for (who, token) in [("customer", ann), ("courier", carl)] {
        let got = as_role(
            Method::PATCH,
            product_url.clone(),
            token,
            Some(json!({"stockDelta": 5})),
        )
        .await?;
        if got.0 != 403 {
            return Err(format!("a {who} changed the stock: {} {}", got.0, got.1));
        }
        let got = as_role(
            Method::GET,
            format!("{}/dead-letters", m.orders),
            token,
            None,
        )
        .await?;
        if got.0 != 403 {
            return Err(format!("a {who} read the dead letters: {}", got.0));
        }
    }
    expect(
        "admin changes the stock",
        as_role(
            Method::PATCH,
            product_url,
            ops,
            Some(json!({"stockDelta": 5})),
        )
        .await?,
        200,
    )?;
    // Customers: their own orders only.
    let mine = expect(
        "ann orders",
        as_role(
            Method::POST,
            orders.clone(),
            ann,
            Some(order_of("ann@12st.mall")),
        )
        .await?,
        201,
    )?;
    let hers = expect(
        "bea orders",
        as_role(
            Method::POST,
            orders.clone(),
            bea,
            Some(order_of("bea@12st.mall")),
        )
        .await?,
        201,
    )?;
    expect(
        "ann orders as bea",
        as_role(
            Method::POST,
            orders.clone(),
            ann,
            Some(order_of("bea@12st.mall")),
        )
        .await?,
        403,
    )?;
    expect(
        "a courier orders",
        as_role(Method::POST, orders.clone(), carl, Some(order_of("carl"))).await?,
        403,
    )?;
    let listed = expect(
        "ann lists",
        as_role(Method::GET, orders.clone(), ann, None).await?,
        200,
    )?;
    let ids: Vec<&Value> = listed
        .as_array()
        .map(|l| l.iter().map(|o| &o["id"]).collect())
        .unwrap_or_default();
    if ids != [&mine["id"]] {
        return Err(format!(
            "ann's list shows {ids:?}, her order is {}",
            mine["id"]
        ));
    }
    expect(
        "ann lists bea's",
        as_role(
            Method::GET,
            format!("{orders}?customerId=bea@12st.mall"),
            ann,
            None,
        )
        .await?,
        403,
    )?;
    let theirs = format!("{orders}/{}", hers["id"]);
    expect(
        "ann reads bea's order",
        as_role(Method::GET, theirs.clone(), ann, None).await?,
        403,
    )?;
    expect(
        "ann reads bea's timeline",
        as_role(Method::GET, format!("{theirs}/events"), ann, None).await?,
        403,
    )?;
    expect(
        "ann reads her order",
        as_role(Method::GET, format!("{orders}/{}", mine["id"]), ann, None).await?,
        200,
    )?;
    let bea_id = hers["id"].as_i64().unwrap_or_default();
    let with_token = m.clone();
    eventually("bea's order completes", SAGA, || async {
        let (_, o) = as_role(
            Method::GET,
            format!("{}/orders/{bea_id}", with_token.orders),
            ops,
            None,
        )
        .await?;
        if o["state"] == "OrderCompleted" {
            Ok(())
        } else {
            Err(format!("{o}"))
        }
    })
    .await?;
    let cancel = Some(json!({"state": "OrderCancelled"}));
    expect(
        "ann cancels bea's order",
        as_role(Method::PATCH, theirs.clone(), ann, cancel.clone()).await?,
        403,
    )?;
    // Courier: deliveries.
    let deliveries = format!("{}/deliveries?orderId={bea_id}", m.delivery);
    expect(
        "a customer lists deliveries",
        as_role(Method::GET, deliveries.clone(), ann, None).await?,
        403,
    )?;
    // The courier may complete only once delivery has heard OrderCompleted, which it consumes
    // on its own time after orders shows it.
    let listed = eventually("the courier sees the delivery confirmed", SAGA, || async {
        let listed = expect(
            "the courier lists deliveries",
            as_role(Method::GET, deliveries.clone(), carl, None).await?,
            200,
        )?;
        if listed[0]["orderConfirmed"] == true {
            Ok(listed)
        } else {
            Err(format!("{listed}"))
        }
    })
    .await?;
    let delivery = &listed[0]["id"];
    expect(
        "the courier completes the delivery",
        as_role(
            Method::PATCH,
            format!("{}/deliveries/{delivery}", m.delivery),
            carl,
            Some(json!({"deliveryState": "DeliveryCompleted"})),
        )
        .await?,
        200,
    )?;
    // The refused cancel changed nothing: bea's order delivered, no cancel on the topic.
    let (_, after) = as_role(Method::GET, theirs, bea, None).await?;
    if after["state"] != "OrderCompleted" || after["cancelRequested"] == true {
        return Err(format!("bea's order after ann's refused cancel: {after}"));
    }
    let cancels = read_topic(&m.brokers, &m.topic)
        .await?
        .iter()
        .filter(|e| e.value["orderId"] == bea_id)
        .filter(|e| {
            e.value["eventType"]
                .as_str()
                .is_some_and(|t| t.contains("Cancel"))
        })
        .count();
    if cancels != 0 {
        return Err(format!("{cancels} cancel events for bea's order"));
    }
    exposed_without_tokens_refuses_to_start(stack, bin_dir).await?;
    Ok((mine["id"].as_i64().unwrap_or_default(), bea_id))
}

/// The ids in the dashboard's orders table.
async fn order_rows(client: &fantoccini::Client) -> Check<Vec<i64>> {
    let ids = client
        .execute(
            "return [...document.querySelectorAll('[data-testid=\"order-rows\"] > tr[data-id]')]\
             .map(r => Number(r.dataset.id));",
            Vec::new(),
        )
        .await
        .map_err(|e| format!("reading the orders table: {e}"))?;
    Ok(ids
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default())
}

/// Uses `token` on the dashboard as a person does: types it and presses "use" (the page
/// reloads with it), then waits until the orders table shows exactly `expected`.
async fn dashboard_as(client: &fantoccini::Client, token: &str, expected: &[i64]) -> Check {
    use fantoccini::Locator::Css;
    let field = client
        .find(Css("[data-testid=\"token\"]"))
        .await
        .map_err(|e| format!("the token field: {e}"))?;
    field.clear().await.map_err(|e| e.to_string())?;
    field.send_keys(token).await.map_err(|e| e.to_string())?;
    client
        .find(Css("[data-testid=\"token-use\"]"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    eventually(
        &format!("the orders table shows {expected:?}"),
        SAGA,
        || async {
            let mut rows = order_rows(client).await?;
            rows.sort_unstable();
            if rows == expected {
                Ok(())
            } else {
                Err(format!("it shows {rows:?}"))
            }
        },
    )
    .await
}

/// The dashboard of a mall with tokens: without one it shows a 401 asking for a token and no
/// orders; with the admin's it shows every order; with a customer's, only that customer's.
async fn the_dashboard_asks_for_a_token(
    m: &Mall,
    setup: &Setup<'_>,
    dir: &Path,
    (ann_order, bea_order): (i64, i64),
) -> Check {
    let driver = Chromedriver::start(setup.chromedriver, dir).await?;
    let client = open_browser(&driver, setup.chromium, &[]).await?;
    let checked = async {
        client.goto(&format!("{}/", m.orders)).await.map_err(|e| e.to_string())?;
        eventually("the page asks for a token", SAGA, || async {
            let asked = client
                .execute(
                    "return [...document.querySelectorAll('[data-testid=\"message\"][data-status=\"401\"]')]\
                     .map(m => m.textContent).join(' | ');",
                    Vec::new(),
                )
                .await
                .map_err(|e| e.to_string())?;
            match asked.as_str() {
                Some(text) if text.contains("token") => Ok(()),
                _ => Err(format!("no 401 message: {asked}")),
            }
        })
        .await?;
        if !order_rows(&client).await?.is_empty() {
            return Err("orders shown without a token".to_string());
        }
        dashboard_as(&client, "ops-token-0123456789", &[ann_order, bea_order]).await?;
        dashboard_as(&client, "ann-token-0123456789", &[ann_order]).await
    }
    .await;
    let _ = client.close().await;
    drop(driver);
    checked
}

/// orders on 0.0.0.0 with no tokens exits at once, naming `MALL_TOKENS`.
async fn exposed_without_tokens_refuses_to_start(stack: &Stack, bin_dir: &Path) -> Check {
    let port = free_port().map_err(|e| e.to_string())?;
    let log_path = stack.dir().join("exposed-orders.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(bin_dir.join("orders"))
        .env("HOST", "0.0.0.0")
        .env("PORT", port.to_string())
        .env("KAFKA_BROKERS", stack.brokers())
        .env("DATABASE_URL", stack.dir().join("exposed.db"))
        .env_remove("MALL_TOKENS")
        .env_remove("MALL_TOKENS_FILE")
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let exited = eventually("orders on 0.0.0.0 without tokens exits", SAGA, || {
        let status = child.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = exited?;
    let said = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() || !said.contains("MALL_TOKENS") {
        return Err(format!(
            "orders on 0.0.0.0 without tokens: {status:?}, said {said:?}"
        ));
    }
    Ok(())
}

/// Where the suite runs: the binaries, the broker, the run directory, Chromium.
struct Setup<'a> {
    /// The services' binaries.
    bin_dir: &'a Path,
    /// Which broker the stacks start.
    broker: &'a BrokerKind,
    /// The run directory.
    dir: &'a Path,
    /// Chromium and chromedriver.
    chromium: &'a Path,
    chromedriver: &'a Path,
}

async fn run(stack: &Stack, setup: &Setup<'_>) -> (usize, usize) {
    let (dir, chromium, chromedriver) = (setup.dir, setup.chromium, setup.chromedriver);
    let m = stack.mall();
    let (mut passed, mut failed) = (0, 0);
    let mut record = |name: &str, result: Check| match result {
        Ok(()) => {
            passed += 1;
            println!("PASS {name}");
        }
        Err(e) => {
            failed += 1;
            println!("FAIL {name}: {e}");
        }
    };
    if let Err(e) = eventually("the mall is healthy", SAGA, || m.wait_healthy()).await {
        record("start-up", Err(e));
        return (passed, failed);
    }
    record(
        "foreign origins, hosts and media types are refused",
        foreign_origins_hosts_and_media_types_are_refused(&m).await,
    );
    record(
        "a page on another origin cannot read or act",
        a_page_elsewhere_cannot_read_or_act(&m, dir, chromium, chromedriver).await,
    );
    record(
        "a retried POST with one Idempotency-Key gives one order",
        a_retried_post_gives_one_order(&m).await,
    );
    record(
        "retried keyed PATCHes of products and delivery act once",
        retried_patches_act_once(&m).await,
    );
    record(
        "40 slow uploads do not hold ordinary POSTs",
        slow_uploads_do_not_hold_the_writes(&m).await,
    );
    record(
        "at most 64 event streams are open at once",
        event_streams_are_bounded(&m).await,
    );
    record(
        "at most 256 connections per client address",
        connections_per_address_are_capped(&m).await,
    );
    record(
        "the role matrix (MALL_TOKENS), the dashboard per token, no exposed start without tokens",
        the_role_matrix(setup).await,
    );
    (passed, failed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: security-suite --bin-dir <dir with the services> \
                 (--kafka <dir of Kafka's jars> | --tansu <tansu binary>) \
                 [--postgres URL] [--chromium /usr/bin/chromium] [--chromedriver /usr/bin/chromedriver]";
    let (Some(bin_dir), Ok(broker), Ok(options)) = (
        argument(&args, "--bin-dir"),
        BrokerKind::from_args(&args),
        StackOptions::from_args(&args),
    ) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let chromium = argument(&args, "--chromium").unwrap_or_else(|| "/usr/bin/chromium".into());
    let chromedriver =
        argument(&args, "--chromedriver").unwrap_or_else(|| "/usr/bin/chromedriver".into());
    let bin_dir = match bin_dir.canonicalize() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("--bin-dir {}: {e}", bin_dir.display());
            return ExitCode::from(2);
        }
    };
    let dir = match tempfile::Builder::new().prefix("mall-security-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("cannot create a run directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("security suite: logs in {}", dir.path().display());
    let mut stack =
        match Stack::start_with_options(dir.path(), &bin_dir, &broker, Vec::new(), options) {
            Ok(stack) => stack,
            Err(e) => {
                println!("FAIL start-up: {e}");
                println!("0 passed, 1 failed");
                return ExitCode::FAILURE;
            }
        };
    let setup = Setup {
        bin_dir: &bin_dir,
        broker: &broker,
        dir: dir.path(),
        chromium: &chromium,
        chromedriver: &chromedriver,
    };
    let (passed, failed) = tokio::select! {
        counts = run(&stack, &setup) => counts,
        _ = kafka::shutdown_signal() => {
            println!("interrupted");
            (0, 1)
        }
    };
    stack.stop();
    if failed > 0 {
        println!("logs kept in {}", dir.keep().display());
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
