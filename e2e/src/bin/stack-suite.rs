//! The real-broker end-to-end suite (`scripts/test.sh` runs it): a fresh broker and fresh
//! databases on free ports, the three service binaries as separate processes, and the saga
//! scenarios over HTTP — including 100 concurrent orders and a `kill -9` of products while
//! orders are in flight. Every process it starts is stopped when it ends, even on failure.
//! Prints one line per scenario and a closing `N passed, N failed`.
//!
//! Usage: `stack-suite --bin-dir target/debug --kafka .tools/kafka-4.1.1/libs [--postgres URL]
//! [--instances N] [--partitions P]` — `--postgres` gives each service a fresh database on that
//! server, `--instances` runs N processes per service on it (the scenarios talk to instance 1),
//! `--partitions` sets `KAFKA_PARTITIONS`. With two or more instances, one more scenario sends
//! the same conflicting cancel to two orders instances at once.

use e2e::broker::BrokerKind;
use e2e::kafka_tools;
use e2e::stack::{Stack, StackOptions, argument};
use e2e::{Check, eventually, read_topic, scenarios};
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Instance 1 of each service, knowing them all: its quiet waits ask every instance, as they
/// share the partitions.
fn mall(stack: &Stack) -> e2e::Mall {
    let services = ["orders", "products", "delivery"]
        .into_iter()
        .map(|s| (s, stack.instances(s).iter().map(|i| stack.url(i)).collect()))
        .collect();
    stack.mall().with_instances(services)
}

/// Orders' database lost while the broker keeps the topic (deleted between two runs): orders
/// rebuilds its orders from the topic before it serves, and issues no id the topic holds. The
/// old orders read as before; a new order gets an id above every old one and completes on its
/// own reservation; the old sagas stay as they were in products and delivery, and nothing new
/// is published for them.
async fn a_new_orders_database_issues_no_id_the_topic_holds(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("ids kept", 10).await?;
    let delivered = m.place_order(product, 2).await?;
    m.wait_order_state(delivered, "OrderCompleted").await?;
    let delivery = m.wait_delivery_confirmed(delivered).await?;
    m.expect(
        "PATCH",
        &format!(
            "{}/deliveries/{}",
            m.delivery,
            e2e::field_i64(&delivery, "id")?
        ),
        Some(serde_json::json!({ "deliveryState": "DeliveryCompleted" })),
        200,
    )
    .await?;
    m.wait_delivery_state(delivered, "DeliveryCompleted")
        .await?;
    let open = m.place_order(product, 3).await?;
    m.wait_order_state(open, "OrderCompleted").await?;
    m.wait_quiet().await?;
    let on_topic = |messages: &[e2e::TopicMessage], id: i64| {
        messages
            .iter()
            .filter(|msg| msg.value["orderId"] == id)
            .count()
    };
    let before = read_topic(&m.brokers, &m.topic).await?;
    let highest = before
        .iter()
        .filter_map(|msg| msg.value["orderId"].as_i64())
        .max()
        .ok_or("no order id on the topic")?;
    let old_events = (on_topic(&before, delivered), on_topic(&before, open));
    let shown = |o: serde_json::Value| {
        (
            o["state"].clone(),
            o["deliveryState"].clone(),
            o["quantity"].clone(),
        )
    };
    let old_orders = (
        shown(m.order(delivered).await?),
        shown(m.order(open).await?),
    );

    stack.terminate("orders", Duration::from_secs(20)).await?;
    let path = stack
        .database_url("orders")
        .ok_or("orders has no database")?
        .to_owned();
    for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot remove {file}: {e}"));
            }
            _ => {}
        }
    }
    stack.start_service("orders")?;
    m.wait_healthy().await?;

    let rebuilt = (
        shown(m.order(delivered).await?),
        shown(m.order(open).await?),
    );
    if rebuilt != old_orders {
        return Err(format!(
            "the rebuilt orders read {rebuilt:?}, before the loss {old_orders:?}"
        ));
    }
    let new = m.place_order(product, 1).await?;
    if new <= highest {
        return Err(format!(
            "the new database issued order id {new}; the topic already holds ids up to {highest}"
        ));
    }
    m.wait_order_state(new, "OrderCompleted").await?;
    m.wait_quiet().await?;
    m.wait_delivery_state(delivered, "DeliveryCompleted")
        .await?;
    m.wait_delivery_state(open, "DeliveryStarted").await?;
    m.wait_delivery_state(new, "DeliveryStarted").await?;
    // 10 units: 2 delivered, 3 and 1 reserved.
    m.wait_stock(product, (4, 4)).await?;
    let after = read_topic(&m.brokers, &m.topic).await?;
    let now = (on_topic(&after, delivered), on_topic(&after, open));
    if now != old_events {
        return Err(format!(
            "events of the old orders {delivered} and {open} went from {old_events:?} to {now:?}"
        ));
    }
    let decreased: Vec<_> = after
        .iter()
        .filter(|msg| msg.value["orderId"] == new && msg.value["eventType"] == "StockDecreased")
        .map(|msg| msg.value["quantity"].clone())
        .collect();
    if decreased != [serde_json::json!(1)] {
        return Err(format!(
            "the new order {new} should have one StockDecreased of 1 unit: {decreased:?}"
        ));
    }
    Ok(())
}

/// Every list a service shows through REST, page by page (`after` = the last id), without the
/// fields that say when a row was written (a rebuild writes it again).
async fn every_row(
    m: &e2e::Mall,
    base: &str,
    path: &str,
    id: &str,
) -> Check<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let page = m
            .expect(
                "GET",
                &format!("{base}{path}?after={after}&limit=1000"),
                None,
                200,
            )
            .await?;
        let page = page
            .as_array()
            .ok_or(format!("{path} is not a list"))?
            .clone();
        let Some(last) = page.last() else {
            return Ok(rows);
        };
        after = e2e::field_i64(last, id)?;
        for mut row in page {
            if let Some(fields) = row.as_object_mut() {
                fields.remove("createdAt");
                fields.remove("updatedAt");
            }
            rows.push(row);
        }
    }
}

/// What the three services show: orders, catalog, reservations, deliveries.
async fn everything(m: &e2e::Mall) -> Check<[Vec<serde_json::Value>; 4]> {
    Ok([
        every_row(m, &m.orders, "/orders", "id").await?,
        every_row(m, &m.products, "/products", "id").await?,
        every_row(m, &m.products, "/reservations", "orderId").await?,
        every_row(m, &m.delivery, "/deliveries", "id").await?,
    ])
}

/// All three databases lost while the broker keeps the topic (issue 23 item 2): each service
/// rebuilds from the topic before it serves. Every old order, product, reservation and delivery
/// reads as before; products and delivery agree with orders on each old saga (delivered,
/// cancelled with the stock back, out of stock, a delivery started but not completed); the
/// restarts publish nothing (the topic holds the same messages), so no old saga is decided
/// again and the seed adds no catalog; a new order completes on one StockDecreased of its own
/// with an order id and a delivery id the topic did not hold; stock is conserved.
async fn all_three_databases_lost_are_rebuilt_from_the_topic(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("all rebuilt", 20).await?;
    let url = format!("{}/products/{product}", m.products);
    let patch = serde_json::json!({ "name": "all rebuilt (patched)", "stockDelta": 5 });
    m.expect("PATCH", &url, Some(patch), 200).await?;
    let delivered = m.place_order(product, 2).await?;
    m.wait_order_state(delivered, "OrderCompleted").await?;
    let delivery = m.wait_delivery_confirmed(delivered).await?;
    let id = e2e::field_i64(&delivery, "id")?;
    let courier = serde_json::json!({ "deliveryState": "DeliveryCompleted" });
    m.expect(
        "PATCH",
        &format!("{}/deliveries/{id}", m.delivery),
        Some(courier),
        200,
    )
    .await?;
    m.wait_delivery_state(delivered, "DeliveryCompleted")
        .await?;
    let cancelled = m.place_order(product, 3).await?;
    m.wait_order_state(cancelled, "OrderCompleted").await?;
    let cancel = serde_json::json!({ "state": "OrderCancelled" });
    m.expect(
        "PATCH",
        &format!("{}/orders/{cancelled}", m.orders),
        Some(cancel),
        202,
    )
    .await?;
    m.wait_order_state(cancelled, "OrderCancelled").await?;
    let refused = m.place_order(product, 1000).await?;
    m.wait_order_state(refused, "OrderCancelled").await?;
    let open = m.place_order(product, 4).await?;
    m.wait_order_state(open, "OrderCompleted").await?;
    m.wait_quiet().await?;
    // 25 units: 2 delivered, 4 reserved, the cancelled 3 back on hand.
    m.wait_stock(product, (19, 4)).await?;
    let topic_before = read_topic(&m.brokers, &m.topic).await?;
    let shown_before = everything(&m).await?;

    for service in ["orders", "products", "delivery"] {
        stack.terminate(service, Duration::from_secs(20)).await?;
    }
    for service in ["orders", "products", "delivery"] {
        let path = stack
            .database_url(service)
            .ok_or(format!("{service} has no database"))?
            .to_owned();
        for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("cannot remove {file}: {e}"));
                }
                _ => {}
            }
        }
    }
    for service in ["orders", "products", "delivery"] {
        stack.start_service(service)?;
    }
    m.wait_healthy().await?;
    m.wait_quiet().await?;

    let shown_after = everything(&m).await?;
    for (what, (before, after)) in ["orders", "products", "reservations", "deliveries"]
        .iter()
        .zip(shown_before.iter().zip(shown_after.iter()))
    {
        if before != after {
            let gone: Vec<_> = before
                .iter()
                .filter(|r| !after.contains(r))
                .take(3)
                .collect();
            let new: Vec<_> = after
                .iter()
                .filter(|r| !before.contains(r))
                .take(3)
                .collect();
            return Err(format!(
                "GET /{what} after the rebuild differs ({} rows before, {} after): before only \
                 {gone:?}, after only {new:?}",
                before.len(),
                after.len()
            ));
        }
    }
    let topic_after = read_topic(&m.brokers, &m.topic).await?;
    if topic_after.len() != topic_before.len() {
        let new: Vec<_> = topic_after[topic_before.len().min(topic_after.len())..]
            .iter()
            .map(|msg| msg.value.to_string())
            .take(5)
            .collect();
        return Err(format!(
            "the restarts published: {} messages before, {} after: {new:?}",
            topic_before.len(),
            topic_after.len()
        ));
    }
    // The three agree on each old saga.
    for (order, state, reservation, delivery_state) in [
        (
            delivered,
            "OrderCompleted",
            "Delivered",
            "DeliveryCompleted",
        ),
        (cancelled, "OrderCancelled", "Released", "DeliveryCancelled"),
        (refused, "OrderCancelled", "Rejected", "DeliveryCancelled"),
        (open, "OrderCompleted", "Reserved", "DeliveryStarted"),
    ] {
        let (o, d, r) = views_of(&m, order).await?;
        let got = (
            o["state"].as_str(),
            r["state"].as_str(),
            d["deliveryState"].as_str(),
        );
        if got != (Some(state), Some(reservation), Some(delivery_state)) {
            return Err(format!(
                "order {order}: orders, products, delivery say {got:?}, expected \
                 ({state}, {reservation}, {delivery_state})"
            ));
        }
    }

    let highest_order = topic_before
        .iter()
        .filter_map(|msg| msg.value["orderId"].as_i64())
        .max()
        .ok_or("no order id on the topic")?;
    let old_delivery_ids: std::collections::HashSet<i64> = topic_before
        .iter()
        .filter_map(|msg| msg.value["deliveryId"].as_i64())
        .collect();
    let new = m.place_order(product, 1).await?;
    if new <= highest_order {
        return Err(format!(
            "order id {new} issued again; the topic holds ids up to {highest_order}"
        ));
    }
    m.wait_order_state(new, "OrderCompleted").await?;
    let new_delivery = e2e::field_i64(&m.delivery_of(new).await?, "id")?;
    if old_delivery_ids.contains(&new_delivery) {
        return Err(format!(
            "the new order's delivery id {new_delivery} is already on the topic"
        ));
    }
    m.wait_quiet().await?;
    let after = read_topic(&m.brokers, &m.topic).await?;
    let decreased: Vec<_> = after
        .iter()
        .filter(|msg| msg.value["orderId"] == new && msg.value["eventType"] == "StockDecreased")
        .map(|msg| msg.value["quantity"].clone())
        .collect();
    if decreased != [serde_json::json!(1)] {
        return Err(format!(
            "the new order {new} should have one StockDecreased of 1 unit: {decreased:?}"
        ));
    }
    let p = m.expect("GET", &url, None, 200).await?;
    let units = (
        e2e::field_i64(&p, "stock")?,
        e2e::field_i64(&p, "reserved")?,
        e2e::field_i64(&p, "delivered")?,
    );
    if units != (18, 5, 2) {
        return Err(format!(
            "product {product}: (stock, reserved, delivered) is {units:?}, expected (18, 5, 2) of 25"
        ));
    }
    Ok(())
}

/// `kill -9` products while orders are being placed, restart it: every saga still ends, every
/// order reserves its stock exactly once.
async fn products_killed_mid_flight(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("crash", 50).await?;
    let placing = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..40 {
                ids.push(m.place_order(product, 1).await?);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, String>(ids)
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    stack.kill("products");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.start_service("products")?;
    println!("    restarted products");
    let ids = placing.await.map_err(|e| e.to_string())??;
    m.wait_healthy().await?;
    for id in &ids {
        eventually(
            &format!("order {id} completes"),
            Duration::from_secs(90),
            || m.wait_order_state(*id, "OrderCompleted"),
        )
        .await?;
    }
    m.wait_stock(product, (10, 40)).await?;
    m.wait_quiet().await?;
    let mut decreased: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for message in read_topic(&m.brokers, &m.topic).await? {
        if message.value["eventType"] == "StockDecreased" && message.value["productId"] == product {
            decreased
                .entry(message.value["orderId"].to_string())
                .or_default()
                .insert(message.value["eventId"].to_string());
        }
    }
    if decreased.len() != ids.len() || decreased.values().any(|ids| ids.len() != 1) {
        return Err(format!(
            "expected one StockDecreased per order for {} orders, got {decreased:?}",
            ids.len()
        ));
    }
    Ok(())
}

/// With two or more instances per service: an order placed on instance 1 reads the same on
/// instance 2, and the same cancel sent at once to two orders instances is accepted once (202)
/// and refused once (409), with exactly one OrderCancelRequested, one OrderCancelled and one
/// StockIncreased on the topic.
async fn conflicting_cancel_on_two_instances(stack: &Stack) -> Check {
    let (m1, m2) = (stack.mall_of(1), stack.mall_of(2));
    let product = m1.create_product("two-instances", 10).await?;
    let order = m1.place_order(product, 2).await?;
    let on_1 = m1.wait_order_state(order, "OrderCompleted").await?;
    let on_2 = m2.order(order).await?;
    if on_1 != on_2 {
        return Err(format!(
            "order {order} reads differently: instance 1 {on_1}, instance 2 {on_2}"
        ));
    }
    let body = serde_json::json!({ "state": "OrderCancelled" });
    let (url_1, url_2) = (
        format!("{}/orders/{order}", m1.orders),
        format!("{}/orders/{order}", m2.orders),
    );
    let (a, b) = tokio::join!(
        m1.call("PATCH", &url_1, Some(body.clone())),
        m2.call("PATCH", &url_2, Some(body)),
    );
    let (a, b) = (a?, b?);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    if statuses != [202, 409] {
        return Err(format!(
            "expected one 202 and one 409, got {} {} and {} {}",
            a.0, a.1, b.0, b.1
        ));
    }
    m2.wait_order_state(order, "OrderCancelled").await?;
    m1.wait_stock(product, (10, 0)).await?;
    m1.wait_order_state(order, "OrderCancelled").await?;
    const KINDS: [&str; 3] = ["OrderCancelRequested", "OrderCancelled", "StockIncreased"];
    // Committed is not yet published, and a late duplicate comes after the first copy: count
    // once every instance's outbox is empty and every partition read to its end.
    mall(stack).wait_quiet().await?;
    let events = m1.topic_events_of(order).await?;
    for kind in KINDS {
        let n = events.iter().filter(|e| e["eventType"] == kind).count();
        if n != 1 {
            return Err(format!("expected one {kind} for order {order}, got {n}"));
        }
    }
    Ok(())
}

/// SIGTERM orders right after a burst of orders, with a dashboard's event stream open: it stops
/// by itself, cleanly, ending the stream rather than waiting out its 5 s HTTP drain for it, and
/// after a restart every saga of the burst completes.
async fn graceful_stop(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("graceful", 20).await?;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(m.place_order(product, 1).await?);
    }
    let mut stream = reqwest::get(format!("{}/events/stream", m.orders))
        .await
        .map_err(|e| format!("GET /events/stream: {e}"))?;
    stream
        .chunk()
        .await
        .map_err(|e| format!("reading the event stream: {e}"))?
        .ok_or("the event stream ended before its hello")?;
    let took = stack.terminate("orders", Duration::from_secs(20)).await?;
    println!(
        "    orders stopped on SIGTERM in {:.2} s with an event stream open",
        took.as_secs_f64()
    );
    // HTTP_DRAIN_SECS in kafka/src/host.rs: a stream left open would hold the stop this long.
    if took >= Duration::from_secs(5) {
        return Err(format!(
            "orders took {took:?} to stop: the open event stream held the HTTP drain"
        ));
    }
    while let Some(_frame) = stream
        .chunk()
        .await
        .map_err(|e| format!("the event stream broke instead of ending: {e}"))?
    {}
    stack.start_service("orders")?;
    m.wait_healthy().await?;
    for id in &ids {
        m.wait_order_state(*id, "OrderCompleted").await?;
    }
    m.wait_stock(product, (10, 10)).await
}

/// Restarts `service` with `KAFKA_BROKERS` (and more) set as given; `None` restores the
/// stack's own.
async fn restart_with(
    stack: &mut Stack,
    service: &'static str,
    env: &[(&str, Option<String>)],
) -> Check {
    stack.terminate(service, Duration::from_secs(20)).await?;
    for (name, value) in env {
        match value {
            Some(v) => stack.set_env(service, name, v),
            None => stack.unset_env(service, name),
        }
    }
    stack.start_service(service)?;
    mall(stack).wait_healthy().await
}

/// The consumer's connection hangs — open, silent, as on a half-dead network path — while the
/// broker answers everyone else: delivery, talking to the broker through a proxy, has its
/// consumer's connections frozen. The watchdog sees events waiting with no progress and
/// reopens the consumer; the order completes long before librdkafka would give up on the
/// connection by itself (`socket.timeout.ms`, 60 s), and `/health` says the consumer was
/// reopened and why.
async fn a_hung_consumer_is_reopened_by_the_watchdog(stack: &mut Stack) -> Check {
    let Some((_, through_proxy)) = stack.proxy() else {
        return Err("needs a single Kafka node (the proxy's listener)".into());
    };
    restart_with(stack, "delivery", &[("KAFKA_BROKERS", Some(through_proxy))]).await?;
    let m = mall(stack);
    let product = m.create_product("hung-consumer", 10).await?;
    // A first order proves delivery reads through the proxy.
    let first = m.place_order(product, 1).await?;
    m.wait_order_state(first, "OrderCompleted").await?;
    let reopened = |health: &serde_json::Value| health["consumer"]["reopened"].as_i64();
    let (_, health) = m
        .call("GET", &format!("{}/health", m.delivery), None)
        .await?;
    let reopened_before = reopened(&health).ok_or(format!("no consumer.reopened in {health}"))?;
    let is_consumer = |id: &str| id.starts_with("delivery") && id.ends_with("/consumer");
    let (proxy, _) = stack.proxy().ok_or("the proxy went away")?;
    let frozen_at = Instant::now();
    let frozen = proxy.freeze(is_consumer);
    if frozen == 0 {
        return Err("delivery's consumer has no connection through the proxy to freeze".into());
    }
    let order = m.place_order(product, 1).await?;
    eventually(
        &format!("order {order} completes with delivery's consumer hung"),
        Duration::from_secs(40),
        || async {
            let o = m.order(order).await?;
            match o["state"] == "OrderCompleted" {
                true => Ok(()),
                false => Err(format!("order {order} is {o}")),
            }
        },
    )
    .await?;
    let took = frozen_at.elapsed();
    let (_, health) = m
        .call("GET", &format!("{}/health", m.delivery), None)
        .await?;
    let reopened_after = reopened(&health).unwrap_or(0);
    let reason = health["consumer"]["lastReopen"]
        .as_str()
        .unwrap_or_default();
    let new_connections = proxy.opened_since(frozen_at, is_consumer);
    println!(
        "    {frozen} connection(s) frozen; reopened {}x, completed after {:.1} s; {new_connections} new consumer connection(s); reason: {reason}",
        reopened_after - reopened_before,
        took.as_secs_f64()
    );
    let checks = [
        (reopened_after > reopened_before, "/health counts no reopen"),
        (reason.contains("no progress"), "/health gives no reason"),
        (new_connections > 0, "no new consumer connection"),
    ];
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, why)| *why)
        .collect();
    restart_with(stack, "delivery", &[("KAFKA_BROKERS", None)]).await?;
    if !failed.is_empty() {
        return Err(format!("the order completed, but: {}", failed.join("; ")));
    }
    m.wait_stock(product, (8, 2)).await
}

/// The environment that points `service` at the broker's SASL/SCRAM listener as its own user,
/// the password in a file of mode 0600 (`password` replaces the right one); `None` values
/// restore the stack's plaintext listener.
fn sasl_env(
    stack: &Stack,
    service: &'static str,
    password: Option<&str>,
) -> Result<Vec<(&'static str, Option<String>)>, String> {
    use std::os::unix::fs::PermissionsExt;
    let sasl = stack
        .sasl_listener()
        .ok_or("needs a single Kafka node (its SASL listener)")?;
    // Another password goes to a file of its own: the right one's file stays right.
    let (password, file) = match password {
        Some(p) => (p, format!("{service}.other-kafka-password")),
        None => (
            sasl.password(service)
                .ok_or(format!("no SCRAM user {service}"))?,
            format!("{service}.kafka-password"),
        ),
    };
    let file = stack.dir().join(file);
    std::fs::write(&file, password).map_err(|e| format!("{}: {e}", file.display()))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(vec![
        (
            "KAFKA_BROKERS",
            Some(format!("127.0.0.1:{}", sasl.sasl_port)),
        ),
        ("KAFKA_CLIENT_SECURITY_PROTOCOL", Some("SASL_SSL".into())),
        (
            "KAFKA_CLIENT_SSL_CA_LOCATION",
            Some(sasl.ca_pem.to_string_lossy().into_owned()),
        ),
        ("KAFKA_CLIENT_SASL_MECHANISMS", Some("SCRAM-SHA-256".into())),
        ("KAFKA_CLIENT_SASL_USERNAME", Some(service.into())),
        (
            "KAFKA_SASL_PASSWORD_FILE",
            Some(file.to_string_lossy().into_owned()),
        ),
    ])
}

/// The services on the broker's SASL/SCRAM listener over TLS (its certificate self-signed,
/// given as `ssl.ca.location`), each as its own user with its password in a file: a saga
/// completes through it, every event on the topic. With a wrong password, and without the
/// certificate, delivery refuses to start, naming the refusal and the settings to check; the
/// orders placed meanwhile complete once delivery has the right settings.
async fn a_saga_through_the_sasl_scram_listener(stack: &mut Stack) -> Check {
    let plaintext = |env: Vec<(&'static str, Option<String>)>| {
        env.into_iter()
            .map(|(name, _)| (name, None))
            .collect::<Vec<_>>()
    };
    for service in ["orders", "products", "delivery"] {
        let env = sasl_env(stack, service, None)?;
        restart_with(stack, service, &env).await?;
    }
    let result = saga_through_sasl(stack).await;
    for service in ["orders", "products", "delivery"] {
        let env = plaintext(sasl_env(stack, service, None)?);
        restart_with(stack, service, &env).await?;
    }
    result
}

async fn saga_through_sasl(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("sasl", 5).await?;
    let order = m.place_order(product, 2).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let types: Vec<String> = m
        .topic_events_of(order)
        .await?
        .iter()
        .map(|e| e["eventType"].as_str().unwrap_or_default().to_owned())
        .collect();
    for expected in [
        "OrderPlaced",
        "StockDecreased",
        "DeliveryStarted",
        "OrderCompleted",
    ] {
        if !types.iter().any(|t| t == expected) {
            return Err(format!(
                "no {expected} of order {order} on the topic: {types:?}"
            ));
        }
    }
    // Turned away: a password that is wrong, a certificate the client does not trust (no
    // `ssl.ca.location`: the system's CAs). Delivery refuses to start each time, saying why.
    let wrong_password = sasl_env(stack, "delivery", Some("not-the-password"))?;
    let untrusted: Vec<_> = sasl_env(stack, "delivery", None)?
        .into_iter()
        .filter(|(name, _)| *name != "KAFKA_CLIENT_SSL_CA_LOCATION")
        .collect();
    let mut waiting = Vec::new();
    for (what, env) in [
        ("a wrong password", wrong_password),
        ("an untrusted certificate", untrusted),
    ] {
        stack.terminate("delivery", Duration::from_secs(20)).await?;
        stack.unset_env("delivery", "KAFKA_CLIENT_SSL_CA_LOCATION");
        for (name, value) in &env {
            stack.set_env("delivery", name, value.as_deref().unwrap_or_default());
        }
        stack.start_service("delivery")?;
        waiting.push(m.place_order(product, 1).await?);
        let status = stack.wait_exited("delivery", Duration::from_secs(45)).await;
        let said = stack.log_line("delivery", "cannot start");
        let right = sasl_env(stack, "delivery", None)?;
        for (name, value) in &right {
            stack.set_env("delivery", name, value.as_deref().unwrap_or_default());
        }
        stack.start_service("delivery")?;
        m.wait_healthy().await?;
        match (status, said) {
            (Ok(status), Some(line))
                if !status.success()
                    && line.contains("connection to the broker was refused")
                    && line.contains("KAFKA_SASL_PASSWORD_FILE") =>
            {
                println!("    {what}: {line}");
            }
            (status, said) => {
                return Err(format!(
                    "with {what} delivery should refuse to start naming the refusal; \
                     exit: {status:?}, said: {said:?}"
                ));
            }
        }
    }
    for order in waiting {
        m.wait_order_state(order, "OrderCompleted").await?;
    }
    Ok(())
}

/// Backpressure from the saga: orders restarted with `ORDERS_MAX_PENDING=3`, products and
/// delivery frozen. Three orders are accepted and stay pending; once orders has counted them
/// (`mall_orders_pending 3` on /metrics) the next is refused with a 503 that names the bound,
/// with `Retry-After`. Thawed, the three complete and orders takes new orders again.
async fn pending_orders_are_bounded(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("bounded", 10).await?;
    stack.set_env("orders", "ORDERS_MAX_PENDING", "3");
    let result = async {
        stack.sigkill("orders")?;
        stack.start_service("orders")?;
        m.wait_healthy().await?;
        stack.sigstop("products")?;
        stack.sigstop("delivery")?;
        let frozen = async {
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(m.place_order(product, 1).await?);
            }
            pending_gauge_reads(&m, 3).await?;
            let response = reqwest::Client::new()
                .post(format!("{}/orders", m.orders))
                .json(&serde_json::json!({"productId": product, "quantity": 1,
                                          "customerId": "e2e@12st.mall"}))
                .send()
                .await
                .map_err(|e| format!("POST /orders: {e}"))?;
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").cloned();
            let body = response.text().await.map_err(|e| e.to_string())?;
            if status != 503 || retry_after.is_none() || !body.contains("at most 3") {
                return Err(format!(
                    "the fourth order: expected 503 with Retry-After naming the bound, got \
                     {status} (Retry-After {retry_after:?}) {body}"
                ));
            }
            println!("    fourth order refused: {body}");
            Ok(ids)
        }
        .await;
        stack.sigcont("products")?;
        stack.sigcont("delivery")?;
        for id in frozen? {
            m.wait_order_state(id, "OrderCompleted").await?;
        }
        pending_gauge_reads(&m, 0).await?;
        m.place_order(product, 1).await.map(|_| ())
    }
    .await;
    stack.set_env(
        "orders",
        "ORDERS_MAX_PENDING",
        &orders::startup::MAX_PENDING_DEFAULT.to_string(),
    );
    stack.sigkill("orders")?;
    stack.start_service("orders")?;
    m.wait_healthy().await?;
    result
}

/// The answers to four orders reach the topic while orders is down, and orders comes back
/// after the orders' deadlines by the clock (`SAGA_TIMEOUT_S=5`, restarted 8 s after): the
/// answers win, every order completes and no OrderCancelled is published (the timeout waits
/// until orders has read the topic past the deadline, `orders/src/timeouts.rs`).
async fn late_answers_win_over_the_timer(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("late answers", 10).await?;
    stack.set_env("orders", "SAGA_TIMEOUT_S", "5");
    let result = async {
        stack.sigkill("orders")?;
        stack.start_service("orders")?;
        m.wait_healthy().await?;
        stack.sigstop("products")?;
        let mut ids = Vec::new();
        let placed = async {
            for _ in 0..4 {
                ids.push(m.place_order(product, 1).await?);
            }
            Ok::<_, String>(())
        }
        .await;
        let published = async {
            placed?;
            // Orders' relay publishes after the commit: wait for it before killing orders.
            eventually(
                "every OrderPlaced is on the topic",
                Duration::from_secs(30),
                || async {
                    let messages = read_topic(&m.brokers, &m.topic).await?;
                    match ids.iter().find(|id| {
                        !messages.iter().any(|msg| {
                            msg.value["eventType"] == "OrderPlaced" && msg.value["orderId"] == **id
                        })
                    }) {
                        Some(id) => Err(format!("no OrderPlaced of order {id} yet")),
                        None => Ok(()),
                    }
                },
            )
            .await
        }
        .await;
        stack.sigkill("orders")?;
        stack.sigcont("products")?;
        published?;
        let placed_at = Instant::now();
        eventually(
            "products and delivery answer every order on the topic",
            Duration::from_secs(30),
            || async {
                let messages = read_topic(&m.brokers, &m.topic).await?;
                for id in &ids {
                    for answer in ["StockDecreased", "DeliveryStarted"] {
                        if !messages.iter().any(|msg| {
                            msg.value["eventType"] == answer && msg.value["orderId"] == *id
                        }) {
                            return Err(format!("no {answer} of order {id} yet"));
                        }
                    }
                }
                Ok(())
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(8).saturating_sub(placed_at.elapsed())).await;
        stack.start_service("orders")?;
        m.wait_healthy().await?;
        for id in &ids {
            let order = m.wait_order_state(*id, "OrderCompleted").await?;
            if order["state"] != "OrderCompleted" {
                return Err(format!("order {id}: {order}"));
            }
        }
        let cancelled: Vec<i64> = read_topic(&m.brokers, &m.topic)
            .await?
            .iter()
            .filter(|msg| msg.value["eventType"] == "OrderCancelled")
            .filter_map(|msg| msg.value["orderId"].as_i64())
            .filter(|id| ids.contains(id))
            .collect();
        if !cancelled.is_empty() {
            return Err(format!(
                "the timer cancelled orders {cancelled:?} whose answers were on the topic"
            ));
        }
        Ok(())
    }
    .await;
    stack.set_env("orders", "SAGA_TIMEOUT_S", "30");
    if stack.is_running("orders") {
        stack.sigkill("orders")?;
    }
    if !stack.is_live("products") {
        let _ = stack.sigcont("products");
    }
    stack.start_service("orders")?;
    m.wait_healthy().await?;
    result
}

/// Restarts `service` with the test-only hook parking every event of `types` it would apply
/// (`kafka::consumer::TEST_PARK_ENV`; empty: none), and waits for the mall to be healthy.
async fn park_on(stack: &mut Stack, service: &'static str, types: &str) -> Check {
    stack.set_env(service, kafka::consumer::TEST_PARK_ENV, types);
    stack.sigkill(service)?;
    stack.start_service(service)?;
    mall(stack).wait_healthy().await
}

/// Waits until orders shows, on `order`, the `event_type` parked by `service`; returns the
/// dead letter's id in that service.
async fn wait_parked(m: &e2e::Mall, order: i64, service: &str, event_type: &str) -> Check<i64> {
    eventually(
        &format!("order {order} shows the {event_type} {service} parked"),
        Duration::from_secs(30),
        || async move {
            let o = m.order(order).await?;
            o["parkedEvents"]
                .as_array()
                .and_then(|parked| {
                    parked
                        .iter()
                        .find(|p| p["service"] == service && p["parkedEventType"] == event_type)
                })
                .and_then(|p| p["deadLetterId"].as_i64())
                .ok_or_else(|| format!("order {order}: {o}"))
        },
    )
    .await
}

/// `POST {base}/dead-letters/{id}/redrive`: 200, and a second one is a 409.
async fn redrive(m: &e2e::Mall, base: &str, id: i64) -> Check {
    let url = format!("{base}/dead-letters/{id}/redrive");
    m.expect("POST", &url, None, 200).await?;
    m.expect("POST", &url, None, 409).await.map(|_| ())
}

/// `order` as each service shows it: orders' order, delivery's delivery, products' reservation.
async fn views_of(
    m: &e2e::Mall,
    order: i64,
) -> Check<(serde_json::Value, serde_json::Value, serde_json::Value)> {
    let o = m.order(order).await?;
    let d = m.delivery_of(order).await?;
    let reservation = format!("{}/reservations/{order}", m.products);
    let r = m.expect("GET", &reservation, None, 200).await?;
    Ok((o, d, r))
}

/// Waits until the three services agree on `order` — orders' state and delivery state,
/// delivery's state, products' reservation — and orders shows no parked event on it.
async fn wait_agreed(
    m: &e2e::Mall,
    order: i64,
    (state, delivery_state, reservation): (&str, &str, &str),
) -> Check {
    eventually(
        &format!("order {order}: {state}, {delivery_state}, {reservation}, nothing parked"),
        Duration::from_secs(30),
        || async move {
            let (o, d, r) = views_of(m, order).await?;
            let agreed = o["state"] == state
                && o["deliveryState"] == delivery_state
                && o["cancelRequested"] == false
                && o["parkedEvents"].as_array().is_some_and(|p| p.is_empty())
                && d["deliveryState"] == delivery_state
                && r["state"] == reservation;
            if agreed {
                Ok(())
            } else {
                Err(format!("orders {o}; delivery {d}; products {r}"))
            }
        },
    )
    .await
}

/// `PATCH /deliveries/{id}` of `order`'s delivery as the courier; the status.
async fn courier(m: &e2e::Mall, order: i64, delivery_state: &str) -> Check<u16> {
    let id = e2e::field_i64(&m.delivery_of(order).await?, "id")?;
    let url = format!("{}/deliveries/{id}", m.delivery);
    let body = serde_json::json!({ "deliveryState": delivery_state });
    Ok(m.call("PATCH", &url, Some(body)).await?.0)
}

/// Issue 24 items 2 and 3 on the real broker: real saga events parked by each service (the
/// test-only hook), each order saying so, the stuck cancel request closed by the timeout, and
/// a redrive of each parked event bringing its saga to a state the three services agree on:
/// delivery parks OrderCompleted (the courier cannot complete) and the customer's
/// OrderCancelRequested; orders parks a courier's DeliveryCancelled, a DeliveryCompleted and
/// a CancelRefused; products parks DeliveryCompleted (the units stay reserved; redriven with
/// `scripts/redrive`).
async fn parked_events_have_a_way_out(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let product = m.create_product("parked", 10).await?;
    let open_dead_letters = || async {
        let health = m
            .expect("GET", &format!("{}/health", m.delivery), None, 200)
            .await?;
        e2e::field_i64(&health["deadLetters"], "open")
    };
    // Earlier scenarios' sagas end first (the hook would park their events too); the poison
    // they parked stays open.
    m.wait_quiet().await?;
    let open_before = open_dead_letters().await?;
    stack.set_env("orders", "SAGA_TIMEOUT_S", "5");
    let result = async {
        park_on(stack, "orders", "").await?;
        park_on(stack, "delivery", "OrderCompleted,OrderCancelRequested").await?;
        let a = m.place_order(product, 1).await?;
        m.wait_order_state(a, "OrderCompleted").await?;
        let a_completed = wait_parked(&m, a, "delivery", "OrderCompleted").await?;
        let status = courier(&m, a, "DeliveryCompleted").await?;
        if status != 409 {
            return Err(format!(
                "the courier completed an unconfirmed delivery: {status}"
            ));
        }
        let b = m.place_order(product, 1).await?;
        m.wait_order_state(b, "OrderCompleted").await?;
        let b_completed = wait_parked(&m, b, "delivery", "OrderCompleted").await?;
        let cancel = serde_json::json!({ "state": "OrderCancelled" });
        m.expect(
            "PATCH",
            &format!("{}/orders/{b}", m.orders),
            Some(cancel.clone()),
            202,
        )
        .await?;
        let b_request = wait_parked(&m, b, "delivery", "OrderCancelRequested").await?;
        eventually(
            "the unanswered cancel request is closed, saying so",
            Duration::from_secs(30),
            || async {
                let o = m.order(b).await?;
                let said = o["stateMessage"].as_str().unwrap_or_default();
                if o["cancelRequested"] == false && said.contains("unanswered") {
                    Ok(())
                } else {
                    Err(o.to_string())
                }
            },
        )
        .await?;
        let open = open_dead_letters().await?;
        let listed = m
            .expect(
                "GET",
                &format!("{}/dead-letters?status=parked&limit=1000", m.delivery),
                None,
                200,
            )
            .await?;
        let of_a_and_b = listed
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|d| d["orderId"] == a || d["orderId"] == b)
                    .count()
            })
            .unwrap_or_default();
        if of_a_and_b != 3 || open < open_before + 3 {
            return Err(format!(
                "delivery: {of_a_and_b} dead letters open for orders {a} and {b}; /health \
                 {open} open, {open_before} before"
            ));
        }
        let metrics = reqwest::get(format!("{}/metrics", m.delivery))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        if e2e::metric_sample(&metrics, "mall_dead_letters_open") != Some(open as f64) {
            return Err(format!(
                "delivery's /metrics: mall_dead_letters_open is not {open}"
            ));
        }
        let timeline = m.timeline(b).await?;
        for kind in ["EventParked", "CancelRequestExpired"] {
            if !timeline.iter().any(|e| e["eventType"] == kind) {
                return Err(format!("order {b}'s timeline has no {kind}"));
            }
        }

        redrive(&m, &m.delivery, a_completed).await?;
        m.wait_delivery_confirmed(a).await?;
        let status = courier(&m, a, "DeliveryCompleted").await?;
        if status != 200 {
            return Err(format!(
                "the courier cannot complete after the redrive: {status}"
            ));
        }
        wait_agreed(&m, a, ("OrderCompleted", "DeliveryCompleted", "Delivered")).await?;
        redrive(&m, &m.delivery, b_completed).await?;
        redrive(&m, &m.delivery, b_request).await?;
        wait_agreed(&m, b, ("OrderCancelled", "DeliveryCancelled", "Released")).await?;
        // The copy on the topic: a new event id, headers naming the original and delivery.
        let letter = m
            .expect(
                "GET",
                &format!("{}/dead-letters/{b_request}", m.delivery),
                None,
                200,
            )
            .await?;
        let original = letter["eventId"].as_str().unwrap_or_default().to_owned();
        let messages = read_topic(&m.brokers, &m.topic).await?;
        let copy = messages
            .iter()
            .find(|msg| {
                msg.value["eventType"] == "OrderCancelRequested"
                    && msg.value["orderId"] == b
                    && msg
                        .headers
                        .iter()
                        .any(|(k, v)| k == "redriveOf" && *v == original)
            })
            .ok_or(format!("no redriven copy of {original} on the topic"))?;
        if copy.value["eventId"] == original.as_str()
            || !copy
                .headers
                .iter()
                .any(|(k, v)| k == "redriveFor" && v == "delivery")
        {
            return Err(format!("the copy: {:?} {}", copy.headers, copy.raw));
        }

        park_on(stack, "delivery", "").await?;
        park_on(
            stack,
            "orders",
            "DeliveryCancelled,DeliveryCompleted,CancelRefused",
        )
        .await?;
        let c = m.place_order(product, 1).await?;
        m.wait_order_state(c, "OrderCompleted").await?;
        if courier(&m, c, "DeliveryCancelled").await? != 200 {
            return Err("the courier cannot cancel".into());
        }
        let c_cancelled = wait_parked(&m, c, "orders", "DeliveryCancelled").await?;
        if m.order(c).await?["state"] != "OrderCompleted" {
            return Err(format!("order {c} moved on without the parked event"));
        }
        redrive(&m, &m.orders, c_cancelled).await?;
        wait_agreed(&m, c, ("OrderCancelled", "DeliveryCancelled", "Released")).await?;
        let d = m.place_order(product, 1).await?;
        m.wait_order_state(d, "OrderCompleted").await?;
        m.wait_delivery_confirmed(d).await?;
        if courier(&m, d, "DeliveryCompleted").await? != 200 {
            return Err("the courier cannot complete".into());
        }
        let d_completed = wait_parked(&m, d, "orders", "DeliveryCompleted").await?;
        // Orders has not heard of the delivery: it asks, delivery refuses, orders parks that.
        m.expect(
            "PATCH",
            &format!("{}/orders/{d}", m.orders),
            Some(cancel),
            202,
        )
        .await?;
        let d_refused = wait_parked(&m, d, "orders", "CancelRefused").await?;
        redrive(&m, &m.orders, d_completed).await?;
        redrive(&m, &m.orders, d_refused).await?;
        wait_agreed(&m, d, ("OrderCompleted", "DeliveryCompleted", "Delivered")).await?;
        let said = m.order(d).await?["stateMessage"].clone();
        if !said
            .as_str()
            .unwrap_or_default()
            .starts_with("cancel refused")
        {
            return Err(format!(
                "order {d} does not say the cancel was refused: {said}"
            ));
        }

        park_on(stack, "orders", "").await?;
        park_on(stack, "products", "DeliveryCompleted").await?;
        let e = m.place_order(product, 1).await?;
        m.wait_order_state(e, "OrderCompleted").await?;
        m.wait_delivery_confirmed(e).await?;
        if courier(&m, e, "DeliveryCompleted").await? != 200 {
            return Err("the courier cannot complete".into());
        }
        let e_completed = wait_parked(&m, e, "products", "DeliveryCompleted").await?;
        let r = m
            .expect(
                "GET",
                &format!("{}/reservations/{e}", m.products),
                None,
                200,
            )
            .await?;
        if r["state"] != "Reserved" {
            return Err(format!("products settled without the parked event: {r}"));
        }
        // This one through scripts/redrive, as an operator would.
        let out = std::process::Command::new("scripts/redrive")
            .args(["redrive", "products", &e_completed.to_string()])
            .env("PRODUCTS_URL", &m.products)
            .output()
            .map_err(|err| format!("scripts/redrive: {err}"))?;
        let said = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !said.contains("redriven as event") {
            return Err(format!(
                "scripts/redrive redrive products {e_completed}: {said}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        wait_agreed(&m, e, ("OrderCompleted", "DeliveryCompleted", "Delivered")).await?;
        // Stock: a, d, e delivered; b, c released.
        m.wait_stock(product, (7, 0)).await
    }
    .await;
    stack.set_env("orders", "SAGA_TIMEOUT_S", "30");
    for service in ["orders", "products", "delivery"] {
        stack.set_env(service, kafka::consumer::TEST_PARK_ENV, "");
        if stack.is_running(service) {
            stack.sigkill(service)?;
        }
        stack.start_service(service)?;
    }
    m.wait_healthy().await?;
    result
}

/// Waits until orders' /metrics shows `mall_orders_pending <n>`.
async fn pending_gauge_reads(m: &e2e::Mall, n: i64) -> Check {
    let want = format!("mall_orders_pending {n}\n");
    eventually(
        &format!("mall_orders_pending {n}"),
        Duration::from_secs(10),
        || async {
            let text = reqwest::get(format!("{}/metrics", m.orders))
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            if text.contains(&want) {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .await
}

/// The issue's reproduction: a confirmed order; the broker is killed; the courier completes
/// (200) and the customer cancels (202: orders cannot have heard of the delivery); the broker
/// comes back. The order stays completed with "cancel refused", nothing is restocked.
async fn delivered_order_cancel_with_broker_down(stack: &mut Stack) -> Check {
    let m = mall(stack);
    let race = scenarios::race_prepare(&m).await?;
    stack.kill_broker();
    println!("    killed the broker (SIGKILL)");
    let acted = scenarios::race_act(&m, &race, true).await;
    stack.restart_broker().await?;
    println!("    restarted the broker on the same storage");
    let status = acted?;
    m.wait_healthy().await?;
    scenarios::race_check(&m, &race, status).await
}

/// With the broker down and events waiting in the outbox, each service still stops on SIGTERM
/// by itself, cleanly, well within `scripts/down.sh`'s 15 s. Runs after the broker is gone.
async fn stop_is_bounded_with_the_broker_down(stack: &mut Stack) -> Check {
    let m = mall(stack);
    // An order placed now leaves OrderPlaced in orders' outbox, unpublishable.
    m.expect(
        "POST",
        &format!("{}/orders", m.orders),
        Some(serde_json::json!({ "productId": 1, "quantity": 1, "customerId": "c" })),
        201,
    )
    .await?;
    for service in ["orders", "products", "delivery"] {
        let took = stack.terminate(service, Duration::from_secs(15)).await?;
        println!(
            "    {service} stopped on SIGTERM in {:.1} s",
            took.as_secs_f64()
        );
    }
    Ok(())
}

/// With the broker gone, `/health` answers 503 and names the broker. Runs last.
async fn health_names_a_missing_broker(stack: &mut Stack) -> Check {
    stack.kill_broker();
    let m = &mall(stack);
    for base in [&m.orders, &m.products, &m.delivery] {
        eventually(
            &format!("{base}/health answers 503 naming the broker"),
            Duration::from_secs(30),
            || async move {
                let (status, body) = m.call("GET", &format!("{base}/health"), None).await?;
                let error = body["error"].as_str().unwrap_or_default();
                if status == 503 && error.contains("broker") && body["database"] == "ok" {
                    Ok(())
                } else {
                    Err(format!("{status} {body}"))
                }
            },
        )
        .await?;
    }
    Ok(())
}

async fn run(stack: &mut Stack) -> (usize, usize) {
    let m = mall(stack);
    if let Err(e) = m.wait_healthy().await {
        println!("FAIL start-up: {e}");
        return (0, 1);
    }
    let (mut passed, mut failed) = (0, 0);
    let mut report = |name: &str, started: Instant, result: Check| match result {
        Ok(()) => {
            passed += 1;
            println!("ok   {name} ({:.1} s)", started.elapsed().as_secs_f64());
        }
        Err(e) => {
            failed += 1;
            println!(
                "FAIL {name} ({:.1} s): {e}",
                started.elapsed().as_secs_f64()
            );
        }
    };
    // `STACK_SUITE_ONLY=<part of a name>`: run only the scenarios whose name contains it.
    let only = std::env::var("STACK_SUITE_ONLY").unwrap_or_default();
    macro_rules! scenario {
        ($name:literal, $run:expr) => {{
            if !$name.contains(only.as_str()) {
                println!("skip {} (STACK_SUITE_ONLY)", $name);
            } else {
                let started = Instant::now();
                println!("...  {}", $name);
                let result = $run.await;
                report($name, started, result);
            }
        }};
    }
    scenario!("happy path", scenarios::happy_path(&m));
    scenario!("out of stock", scenarios::out_of_stock(&m));
    scenario!("customer cancel", scenarios::customer_cancel(&m));
    scenario!("delivery-initiated cancel", scenarios::courier_cancel(&m));
    scenario!(
        "bad input gets clear errors",
        scenarios::bad_input_gets_clear_errors(&m)
    );
    scenario!(
        "a stock write based on an old read is refused (expectedStock)",
        scenarios::a_stock_write_based_on_an_old_read_is_refused(&m)
    );
    scenario!(
        "malformed message parked on the DLT",
        scenarios::malformed_message_is_parked(&m)
    );
    scenario!(
        "100 concurrent orders against a stock of 30",
        scenarios::concurrent_orders(&m, 100, 30)
    );
    if stack.instance_count() == 1 {
        // It reads partition 0's consumer metrics and the saga timing on instance 1, which
        // holds them only when it is the only instance.
        scenario!("metrics", scenarios::metrics_are_exposed(&m));
    } else {
        println!("skip metrics (per-partition metrics live on whichever instance owns it)");
    }
    if stack.instance_count() >= 2 {
        scenario!(
            "two orders instances: one order reads the same; a conflicting cancel wins once",
            conflicting_cancel_on_two_instances(stack)
        );
    }
    scenario!(
        "kill -9 of products mid-flight, then restart",
        products_killed_mid_flight(stack)
    );
    scenario!("every event delivered twice", async {
        let stop = tokio_util::sync::CancellationToken::new();
        let replayer = tokio::spawn(e2e::replay_everything_twice(
            m.brokers.clone(),
            m.topic.clone(),
            stop.clone(),
        ));
        let result = scenarios::every_event_twice(&m).await;
        stop.cancel();
        let _ = replayer.await;
        result
    });
    if stack.proxy().is_some() && stack.instance_count() == 1 {
        // It restarts single services on other listeners; other instances would carry on.
        scenario!(
            "a consumer whose connection hangs is reopened by the watchdog",
            a_hung_consumer_is_reopened_by_the_watchdog(stack)
        );
    }
    if stack.sasl_listener().is_some() && stack.instance_count() == 1 {
        scenario!(
            "a saga through the broker's SASL/SCRAM listener over TLS; a wrong password or an untrusted certificate is refused",
            a_saga_through_the_sasl_scram_listener(stack)
        );
    }
    scenario!(
        "graceful stop (SIGTERM) of orders, then restart",
        graceful_stop(stack)
    );
    if stack.instance_count() == 1 {
        // It freezes products and delivery; other instances would carry the sagas on.
        scenario!(
            "too many pending orders: the next is refused (503), accepted again once they end",
            pending_orders_are_bounded(stack)
        );
    }
    if stack.instance_count() == 1 {
        // It restarts single services with the parking hook; other instances would not park.
        scenario!(
            "parked saga events: each order says so, a cancel request expires, a redrive of each brings all three services to agree",
            parked_events_have_a_way_out(stack)
        );
    }
    if stack.instance_count() == 1 {
        // It freezes products and restarts orders; other instances would carry the sagas on.
        scenario!(
            "answers on the topic before the deadline win over the saga timeout (orders down meanwhile)",
            late_answers_win_over_the_timer(stack)
        );
    }
    if stack.instance_count() == 1
        && !stack
            .database_url("orders")
            .is_some_and(|url| url.starts_with("postgres"))
    {
        // After the other sagas: the new orders database parks the old orders' events it
        // cannot know. Before the scenarios that stop the broker and the services.
        scenario!(
            "orders' database lost, the topic kept: rebuilt from the topic, no order id issued twice",
            a_new_orders_database_issues_no_id_the_topic_holds(stack)
        );
        scenario!(
            "all three databases lost, the topic kept: each service rebuilt from the topic, all agree, nothing republished",
            all_three_databases_lost_are_rebuilt_from_the_topic(stack)
        );
    }
    let on_kafka = matches!(stack.broker_kind(), BrokerKind::Kafka { .. });
    let tools = kafka_tools::default_tools_dir();
    if on_kafka {
        scenario!(
            "the seed's kafka-console-consumer.sh, kafka-topics and kafka-console-producer.sh work verbatim",
            kafka_tools::seed_console_tools_work_verbatim(&m, &tools)
        );
        scenario!(
            "kafka-consumer-groups.sh --describe --all-groups agrees with /health",
            kafka_tools::consumer_groups_show_each_service(stack, &tools)
        );
    }
    scenario!(
        "delivered order cancelled with the broker down: refused, not restocked",
        delivered_order_cancel_with_broker_down(stack)
    );
    scenario!(
        "/health names a missing broker",
        health_names_a_missing_broker(stack)
    );
    scenario!(
        "SIGTERM with the broker down stops each service within 15 s",
        stop_is_bounded_with_the_broker_down(stack)
    );
    if on_kafka {
        // Last: it leaves the stack on a new, empty broker.
        scenario!(
            "a wiped broker (another cluster): a service refuses its old positions, naming the fix",
            kafka_tools::positions_of_another_cluster_are_refused(stack)
        );
    }
    (passed, failed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: stack-suite --bin-dir <dir with orders, products, delivery> \
                 (--kafka <dir of Kafka's jars> | --tansu <tansu binary>) \
                 [--postgres URL] [--instances N] [--partitions P]";
    let Some(bin_dir) = argument(&args, "--bin-dir") else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let (options, broker) = match (StackOptions::from_args(&args), BrokerKind::from_args(&args)) {
        (Ok(o), Ok(b)) => (o, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("stack-suite: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    // The broker runs in the run directory, so relative paths would break.
    let bin_dir = match bin_dir.canonicalize() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("--bin-dir {}: {e}", bin_dir.display());
            return ExitCode::from(2);
        }
    };
    let dir = match tempfile::Builder::new().prefix("mall-e2e-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("cannot create a run directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "real-broker suite: logs and databases in {}",
        dir.path().display()
    );
    let mut stack =
        match Stack::start_with_options(dir.path(), &bin_dir, &broker, Vec::new(), options) {
            Ok(stack) => stack,
            Err(e) => {
                println!("FAIL start-up: {e}");
                println!("0 passed, 1 failed");
                return ExitCode::FAILURE;
            }
        };
    let (passed, failed) = tokio::select! {
        counts = run(&mut stack) => counts,
        _ = kafka::shutdown_signal() => {
            println!("interrupted");
            (0, 1)
        }
    };
    stack.stop();
    if failed > 0 {
        // Keep the logs for a look; the directory is printed above.
        let kept = dir.keep();
        println!("logs kept in {}", kept.display());
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
