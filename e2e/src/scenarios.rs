//! The saga scenarios, each against a running [`Mall`]. Each creates its own product, so they
//! can share one mall and their stock assertions stay absolute.

use crate::{Check, Mall, eventually, field_i64, publish_raw, read_topic};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

/// How many distinct events (by `eventId`) of `event_type` are in `events`: a redelivered copy
/// counts once, a second effect counts twice.
pub fn distinct(events: &[Value], event_type: &str) -> usize {
    events
        .iter()
        .filter(|e| e["eventType"] == event_type)
        .map(|e| e["eventId"].to_string())
        .collect::<HashSet<_>>()
        .len()
}

/// The only event of `event_type` in `events`, or an error naming what was found.
fn single<'a>(events: &'a [Value], event_type: &str) -> Check<&'a Value> {
    match distinct(events, event_type) {
        1 => events
            .iter()
            .find(|e| e["eventType"] == event_type)
            .ok_or_else(|| "unreachable".to_string()),
        n => Err(format!(
            "expected exactly one {event_type}, found {n} in {}",
            types(events)
        )),
    }
}

fn types(events: &[Value]) -> String {
    let names: Vec<&str> = events
        .iter()
        .filter_map(|e| e["eventType"].as_str())
        .collect();
    format!("[{}]", names.join(", "))
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, expected: T) -> Check {
    if got == expected {
        Ok(())
    } else {
        Err(format!("{what}: expected {expected:?}, got {got:?}"))
    }
}

/// Waits until the order's events on the topic include every type in `types_expected`.
async fn wait_topic(m: &Mall, order_id: i64, types_expected: &[&str]) -> Check<Vec<Value>> {
    eventually(
        &format!("the topic has {types_expected:?} for order {order_id}"),
        Duration::from_secs(30),
        || async move {
            let events = m.topic_events_of(order_id).await?;
            if types_expected.iter().all(|t| distinct(&events, t) > 0) {
                Ok(events)
            } else {
                Err(types(&events))
            }
        },
    )
    .await
}

/// The order's events on the topic once the mall is quiet: every copy and every late effect
/// is on the topic by then, so a count of them is final.
async fn settled_events(m: &Mall, order_id: i64) -> Check<Vec<Value>> {
    m.wait_quiet().await?;
    m.topic_events_of(order_id).await
}

/// How many messages of `event_type` are in `events`, copies included.
fn copies(events: &[Value], event_type: &str) -> usize {
    events
        .iter()
        .filter(|e| e["eventType"] == event_type)
        .count()
}

/// Waits until the order's timeline (`GET /orders/{id}/events`) has `n` entries.
async fn wait_timeline(m: &Mall, order_id: i64, n: usize) -> Check<Vec<Value>> {
    eventually(
        &format!("order {order_id}'s timeline has {n} entries"),
        Duration::from_secs(30),
        || async move {
            let t = m.timeline(order_id).await?;
            if t.len() >= n { Ok(t) } else { Err(types(&t)) }
        },
    )
    .await
}

/// Happy path: stock reserved, delivery started, order completed; visible in products, in
/// orders' replica, in delivery, in the timeline and on the topic, with causation links.
pub async fn happy_path(m: &Mall) -> Check {
    let product = m.create_product("happy-path", 10).await?;
    let order = m.place_order(product, 1).await?;
    let placed = m.order(order).await?;
    expect_eq(
        "state right after POST",
        placed["state"].as_str(),
        Some("OrderPlaced"),
    )?;
    m.wait_order_state(order, "OrderCompleted").await?;
    m.wait_stock(product, (9, 1)).await?;
    m.wait_delivery_state(order, "DeliveryStarted").await?;
    eventually(
        "orders' replica shows stock 9",
        Duration::from_secs(30),
        || async move {
            let p = m
                .expect(
                    "GET",
                    &format!("{}/products/{product}", m.orders),
                    None,
                    200,
                )
                .await?;
            if p["stock"] == 9 {
                Ok(())
            } else {
                Err(p.to_string())
            }
        },
    )
    .await?;

    let timeline = wait_timeline(m, order, 4).await?;
    let names: Vec<&str> = timeline
        .iter()
        .filter_map(|e| e["eventType"].as_str())
        .collect();
    expect_eq(
        "first timeline entry",
        names.first().copied(),
        Some("OrderPlaced"),
    )?;
    expect_eq(
        "last timeline entry",
        names.last().copied(),
        Some("OrderCompleted"),
    )?;
    for t in ["StockDecreased", "DeliveryStarted"] {
        if !names.contains(&t) {
            return Err(format!("timeline {names:?} lacks {t}"));
        }
    }

    wait_topic(
        m,
        order,
        &[
            "OrderPlaced",
            "StockDecreased",
            "DeliveryStarted",
            "OrderCompleted",
        ],
    )
    .await?;
    let events = settled_events(m, order).await?;
    let order_placed = single(&events, "OrderPlaced")?;
    let stock = single(&events, "StockDecreased")?;
    let delivery = single(&events, "DeliveryStarted")?;
    let completed = single(&events, "OrderCompleted")?;
    expect_eq(
        "StockDecreased.causationId",
        &stock["causationId"],
        &order_placed["eventId"],
    )?;
    expect_eq(
        "DeliveryStarted.causationId",
        &delivery["causationId"],
        &order_placed["eventId"],
    )?;
    if completed["causationId"] != stock["eventId"]
        && completed["causationId"] != delivery["eventId"]
    {
        return Err(format!(
            "OrderCompleted is not caused by StockDecreased or DeliveryStarted: {completed}"
        ));
    }
    for e in &events {
        expect_eq(
            "correlationId",
            e["correlationId"].as_str(),
            Some(order.to_string().as_str()),
        )?;
        expect_eq(
            "initiator on the forward path",
            &e["initiator"],
            &Value::Null,
        )?;
    }
    Ok(())
}

/// A stock write based on an old read is refused: GET shows 10, an order reserves one
/// (9 + 1 reserved), and a `stock: 10` with `expectedStock: 10` — the blind write that would
/// leave 11 units in existence — is a 409 that changes nothing; with the stock read again
/// it is taken. `stockDelta` takes `expectedStock` too.
pub async fn a_stock_write_based_on_an_old_read_is_refused(m: &Mall) -> Check {
    let product = m.create_product("expected stock", 10).await?;
    let url = format!("{}/products/{product}", m.products);
    let read = m.expect("GET", &url, None, 200).await?;
    expect_eq("stock read", read["stock"].as_i64(), Some(10))?;
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    m.wait_stock(product, (9, 1)).await?;
    let refused = m
        .expect(
            "PATCH",
            &url,
            Some(json!({ "stock": 10, "expectedStock": 10 })),
            409,
        )
        .await?;
    let error = refused["error"].as_str().unwrap_or_default();
    if !error.contains("expectedStock") || !error.contains('9') {
        return Err(format!(
            "the 409 should name expectedStock and the stock now: {refused}"
        ));
    }
    m.expect(
        "PATCH",
        &url,
        Some(json!({ "stockDelta": 1, "expectedStock": 10 })),
        409,
    )
    .await?;
    expect_eq(
        "unchanged after the refusals",
        m.stock(product).await?,
        (9, 1),
    )?;
    let bad = m
        .expect(
            "PATCH",
            &url,
            Some(json!({ "stock": 10, "expectedStock": "nine" })),
            422,
        )
        .await?;
    if !bad["error"]
        .as_str()
        .unwrap_or_default()
        .contains("expectedStock")
    {
        return Err(format!("the 422 should name expectedStock: {bad}"));
    }
    let taken = m
        .expect(
            "PATCH",
            &url,
            Some(json!({ "stock": 12, "expectedStock": 9 })),
            200,
        )
        .await?;
    expect_eq(
        "(stock, reserved) after the write",
        (taken["stock"].as_i64(), taken["reserved"].as_i64()),
        (Some(12), Some(1)),
    )
}

/// Out of stock: ProductOutOfStock → OrderCancelled → DeliveryCancelled, all initiated by
/// products; stock untouched and never "restored".
pub async fn out_of_stock(m: &Mall) -> Check {
    let product = m.create_product("out-of-stock", 10).await?;
    let order = m.place_order(product, 100).await?;
    let cancelled = m.wait_order_state(order, "OrderCancelled").await?;
    let message = cancelled["stateMessage"].as_str().unwrap_or_default();
    if !message.contains("in stock") {
        return Err(format!("stateMessage should say why: {cancelled}"));
    }
    m.wait_delivery_state(order, "DeliveryCancelled").await?;
    wait_topic(
        m,
        order,
        &["ProductOutOfStock", "OrderCancelled", "DeliveryCancelled"],
    )
    .await?;
    let events = settled_events(m, order).await?;
    for t in ["ProductOutOfStock", "OrderCancelled", "DeliveryCancelled"] {
        expect_eq(
            &format!("{t}.initiator"),
            single(&events, t)?["initiator"].as_str(),
            Some("products"),
        )?;
    }
    for t in ["StockDecreased", "StockIncreased", "OrderCompleted"] {
        expect_eq(
            &format!("{t} events for an out-of-stock order"),
            distinct(&events, t),
            0,
        )?;
    }
    wait_timeline(m, order, 4).await?;
    expect_eq("(stock, reserved)", m.stock(product).await?, (10, 0))
}

/// Customer cancel of a confirmed order: orders only requests it (202), delivery calls the
/// delivery off, then the order is cancelled and its stock restored exactly once; a second
/// cancel is a 409.
pub async fn customer_cancel(m: &Mall) -> Check {
    let product = m.create_product("customer-cancel", 10).await?;
    let order = m.place_order(product, 2).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    m.wait_stock(product, (8, 2)).await?;
    let url = format!("{}/orders/{order}", m.orders);
    let body = json!({ "state": "OrderCancelled" });
    let o = m.expect("PATCH", &url, Some(body.clone()), 202).await?;
    expect_eq(
        "cancelRequested after PATCH",
        o["cancelRequested"].as_bool(),
        Some(true),
    )?;
    if !o["stateMessage"]
        .as_str()
        .unwrap_or_default()
        .contains("unless it was already delivered")
    {
        return Err(format!("the 202 should say what will happen: {o}"));
    }
    m.wait_order_state(order, "OrderCancelled").await?;
    m.wait_stock(product, (10, 0)).await?;
    m.wait_delivery_state(order, "DeliveryCancelled").await?;
    let again = m.expect("PATCH", &url, Some(body), 409).await?;
    if !again["error"]
        .as_str()
        .unwrap_or_default()
        .contains("already cancelled")
    {
        return Err(format!(
            "second cancel should say it is already cancelled: {again}"
        ));
    }
    let chain = [
        "OrderCancelRequested",
        "DeliveryCancelled",
        "OrderCancelled",
        "StockIncreased",
    ];
    wait_topic(m, order, &chain).await?;
    let events = settled_events(m, order).await?;
    for t in chain {
        expect_eq(
            &format!("{t}.initiator"),
            single(&events, t)?["initiator"].as_str(),
            Some("orders"),
        )?;
    }
    expect_eq(
        "DeliveryCancelled caused by OrderCancelRequested",
        &single(&events, "DeliveryCancelled")?["causationId"],
        &single(&events, "OrderCancelRequested")?["eventId"],
    )?;
    expect_eq(
        "(stock, reserved) after the chain settled",
        m.stock(product).await?,
        (10, 0),
    )?;
    expect_eq(
        "StockIncreased count",
        distinct(&events, "StockIncreased"),
        1,
    )
}

/// An order whose delivery is confirmed, ready for the delivered-then-cancelled race.
pub struct RaceOrder {
    product: i64,
    order: i64,
    delivery_url: String,
}

/// Part 1 of the race of a courier's completion with a customer's cancel: a confirmed order
/// (stock 9, reserved 1 of 10).
pub async fn race_prepare(m: &Mall) -> Check<RaceOrder> {
    let product = m.create_product("delivered-race", 10).await?;
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let delivery = m.wait_delivery_confirmed(order).await?;
    Ok(RaceOrder {
        product,
        order,
        delivery_url: format!("{}/deliveries/{}", m.delivery, field_i64(&delivery, "id")?),
    })
}

/// Part 2: the courier completes, then at once the customer cancels. With the broker down
/// in between (`outage`), orders cannot have heard of the delivery, so the cancel is accepted
/// as a request (202); without, it may also be refused at once (409). Returns the status.
pub async fn race_act(m: &Mall, race: &RaceOrder, outage: bool) -> Check<u16> {
    m.expect(
        "PATCH",
        &race.delivery_url,
        Some(json!({ "deliveryState": "DeliveryCompleted" })),
        200,
    )
    .await?;
    let (status, body) = m
        .call(
            "PATCH",
            &format!("{}/orders/{}", m.orders, race.order),
            Some(json!({ "state": "OrderCancelled" })),
        )
        .await?;
    match status {
        202 => Ok(202),
        409 if !outage => Ok(409),
        _ => Err(format!("cancel racing a delivery answered {status} {body}")),
    }
}

/// Part 3: whatever the timing, a delivered order is never cancelled and never restocked; a
/// requested cancel ends in CancelRefused, visible in the order.
pub async fn race_check(m: &Mall, race: &RaceOrder, status: u16) -> Check {
    let order = race.order;
    let o = eventually(
        "the race settles with the order completed and delivered",
        Duration::from_secs(60),
        || async move {
            let o = m.order(order).await?;
            if o["state"] == "OrderCompleted"
                && o["deliveryState"] == "DeliveryCompleted"
                && o["cancelRequested"] == false
            {
                Ok(o)
            } else {
                Err(o.to_string())
            }
        },
    )
    .await?;
    m.wait_delivery_state(order, "DeliveryCompleted").await?;
    wait_delivered(m, race.product, (9, 0, 1)).await?;
    if status == 202 {
        let events = wait_topic(m, order, &["CancelRefused"]).await?;
        expect_eq(
            "CancelRefused.initiator",
            single(&events, "CancelRefused")?["initiator"].as_str(),
            Some("orders"),
        )?;
        if !o["stateMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("cancel refused")
        {
            return Err(format!("the order should say the cancel was refused: {o}"));
        }
    }
    let events = settled_events(m, order).await?;
    for t in ["OrderCancelled", "StockIncreased", "DeliveryCancelled"] {
        expect_eq(&format!("{t} events"), distinct(&events, t), 0)?;
    }
    wait_delivered(m, race.product, (9, 0, 1)).await
}

/// Waits until a product's (stock, reserved, delivered) are as expected.
async fn wait_delivered(m: &Mall, product: i64, expected: (i64, i64, i64)) -> Check {
    eventually(
        &format!("product {product} has (stock, reserved, delivered) = {expected:?}"),
        Duration::from_secs(30),
        || async move {
            let p = m
                .expect(
                    "GET",
                    &format!("{}/products/{product}", m.products),
                    None,
                    200,
                )
                .await?;
            let got = (
                field_i64(&p, "stock")?,
                field_i64(&p, "reserved")?,
                field_i64(&p, "delivered")?,
            );
            if got == expected {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await
}

/// The race without an outage (the in-process suite); the stack suite runs it with the
/// broker down between the two PATCHes.
pub async fn delivered_order_cancel_race(m: &Mall) -> Check {
    let race = race_prepare(m).await?;
    let status = race_act(m, &race, false).await?;
    race_check(m, &race, status).await
}

/// Courier cancel: DeliveryCancelled initiated by delivery cancels the order and restores
/// stock once; a delivered order cannot be cancelled by the customer.
pub async fn courier_cancel(m: &Mall) -> Check {
    let product = m.create_product("courier-cancel", 10).await?;
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let delivery = field_i64(&m.delivery_of(order).await?, "id")?;
    let url = format!("{}/deliveries/{delivery}", m.delivery);
    let body = json!({ "deliveryState": "DeliveryCancelled" });
    m.expect("PATCH", &url, Some(body.clone()), 200).await?;
    m.wait_order_state(order, "OrderCancelled").await?;
    m.wait_stock(product, (10, 0)).await?;
    m.expect("PATCH", &url, Some(body), 409).await?;
    let events = wait_topic(
        m,
        order,
        &["DeliveryCancelled", "OrderCancelled", "StockIncreased"],
    )
    .await?;
    for t in ["DeliveryCancelled", "OrderCancelled", "StockIncreased"] {
        expect_eq(
            &format!("{t}.initiator"),
            single(&events, t)?["initiator"].as_str(),
            Some("delivery"),
        )?;
    }

    // A completed delivery: the customer can no longer cancel.
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    let delivery = m.wait_delivery_confirmed(order).await?;
    let url = format!("{}/deliveries/{}", m.delivery, field_i64(&delivery, "id")?);
    m.expect(
        "PATCH",
        &url,
        Some(json!({ "deliveryState": "DeliveryCompleted" })),
        200,
    )
    .await?;
    eventually(
        "orders learns the delivery completed",
        Duration::from_secs(30),
        || async move {
            let o = m.order(order).await?;
            if o["deliveryState"] == "DeliveryCompleted" {
                Ok(())
            } else {
                Err(o.to_string())
            }
        },
    )
    .await?;
    let refused = m
        .expect(
            "PATCH",
            &format!("{}/orders/{order}", m.orders),
            Some(json!({ "state": "OrderCancelled" })),
            409,
        )
        .await?;
    if !refused["error"]
        .as_str()
        .unwrap_or_default()
        .contains("delivered")
    {
        return Err(format!(
            "cancel of a delivered order should say so: {refused}"
        ));
    }
    wait_delivered(m, product, (9, 0, 1)).await
}

/// A malformed message — and a 200,000-byte value of NUL bytes, whose escaped copy would not
/// fit on the broker — is parked on `<topic>.DLT` by every service with its reason, an unknown
/// event type is skipped, and the saga after them still completes.
pub async fn malformed_message_is_parked(m: &Mall) -> Check {
    let garbage = format!("not json at all {}", std::process::id());
    let nul_key = format!("nul-{}", std::process::id());
    crate::publish_raw_bytes(&m.brokers, &m.topic, &nul_key, &vec![0u8; 200_000]).await?;
    publish_raw(&m.brokers, &m.topic, "garbage", &garbage).await?;
    publish_raw(
        &m.brokers,
        &m.topic,
        "garbage",
        r#"{"eventType":"OrderPlaced","timestamp":"20200528152024","me":true}"#,
    )
    .await?;
    publish_raw(
        &m.brokers,
        &m.topic,
        "garbage",
        r#"{"eventType":"PaymentApproved","orderId":1}"#,
    )
    .await?;
    // A well-formed event whose text holds a NUL: PostgreSQL cannot store it, so it is parked
    // as invalid at once instead of failing its write for ever (the partition would stop).
    let nul_text_key = format!("nul-text-{}", std::process::id());
    let nul_text = events::Envelope::new(
        events::Service::Orders,
        events::Event::OrderPlaced(events::OrderPlaced {
            order_id: 990_000 + i64::from(std::process::id() % 10_000),
            product_id: 1,
            product_name: Some("TV".into()),
            quantity: 1,
            price: Some(1),
            customer_id: "c".into(),
            customer_name: Some("a\u{0}b".into()),
            customer_addr: None,
        }),
    );
    let nul_text = serde_json::to_string(&nul_text).map_err(|e| e.to_string())?;
    publish_raw(&m.brokers, &m.topic, &nul_text_key, &nul_text).await?;
    happy_path(m).await?;
    let dlt = format!("{}.DLT", m.topic);
    eventually(
        "every service parked the malformed message",
        Duration::from_secs(30),
        || {
            let dlt = dlt.clone();
            let garbage = garbage.clone();
            let nul_key = nul_key.clone();
            let nul_text_key = nul_text_key.clone();
            async move {
                let letters = read_topic(&m.brokers, &dlt).await?;
                let groups: HashSet<String> = letters
                    .iter()
                    .filter(|l| {
                        l.value["payloadPreview"] == garbage.as_str()
                            && l.value["kind"] == "Undecodable"
                            && !l.value["reason"].as_str().unwrap_or_default().is_empty()
                    })
                    .filter_map(|l| l.value["consumerGroup"].as_str().map(str::to_owned))
                    .collect();
                let nul_groups: HashSet<String> = letters
                    .iter()
                    .filter(|l| {
                        l.value["key"] == nul_key.as_str()
                            && l.value["payloadBytes"] == 200_000
                            && l.value["payloadTruncated"] == true
                            && l.raw.len() < 20_000
                    })
                    .filter_map(|l| l.value["consumerGroup"].as_str().map(str::to_owned))
                    .collect();
                if nul_groups.len() < 3 {
                    return Err(format!(
                        "the 200 KB NUL message was parked by {nul_groups:?}"
                    ));
                }
                let nul_text_groups: HashSet<String> = letters
                    .iter()
                    .filter(|l| {
                        let reason = l.value["reason"].as_str().unwrap_or_default();
                        l.value["key"] == nul_text_key.as_str()
                            && reason.contains("customerName")
                            && reason.contains("NUL")
                    })
                    .filter_map(|l| l.value["consumerGroup"].as_str().map(str::to_owned))
                    .collect();
                if nul_text_groups.len() < 3 {
                    return Err(format!(
                        "the event with a NUL in customerName was parked by {nul_text_groups:?}"
                    ));
                }
                let unknown_parked = letters.iter().any(|l| l.raw.contains("PaymentApproved"));
                if unknown_parked {
                    return Err("an unknown event type was parked; it should be skipped".into());
                }
                if ["orders", "products", "delivery"]
                    .iter()
                    .all(|g| groups.contains(*g))
                {
                    Ok(())
                } else {
                    Err(format!("parked by {groups:?}"))
                }
            }
        },
    )
    .await
}

/// With every event delivered twice (a replayer copies the topic onto itself), nothing happens
/// twice: one reservation, one release, one timeline entry per event.
pub async fn every_event_twice(m: &Mall) -> Check {
    let product = m.create_product("duplicates", 10).await?;
    let order = m.place_order(product, 3).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    m.expect(
        "PATCH",
        &format!("{}/orders/{order}", m.orders),
        Some(json!({ "state": "OrderCancelled" })),
        202,
    )
    .await?;
    m.wait_stock(product, (10, 0)).await?;
    let refused = m.place_order(product, 11).await?;
    m.wait_order_state(refused, "OrderCancelled").await?;
    m.wait_delivery_state(refused, "DeliveryCancelled").await?;

    // Prove every event was really delivered twice, and every copy read by every service,
    // before judging their effect.
    const CHAIN: [&str; 8] = [
        "OrderPlaced",
        "StockDecreased",
        "DeliveryStarted",
        "OrderCompleted",
        "OrderCancelRequested",
        "OrderCancelled",
        "DeliveryCancelled",
        "StockIncreased",
    ];
    const REFUSED_CHAIN: [&str; 5] = [
        "OrderPlaced",
        "ProductOutOfStock",
        "DeliveryStarted",
        "OrderCancelled",
        "DeliveryCancelled",
    ];
    for (id, chain) in [(order, &CHAIN[..]), (refused, &REFUSED_CHAIN[..])] {
        eventually(
            &format!("the topic carries every event of order {id} twice"),
            Duration::from_secs(30),
            || async move {
                let events = m.topic_events_of(id).await?;
                let once: Vec<&str> = chain
                    .iter()
                    .copied()
                    .filter(|t| copies(&events, t) < 2)
                    .collect();
                if once.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not twice: {once:?} in {}", types(&events)))
                }
            },
        )
        .await?;
    }
    let events = settled_events(m, order).await?;
    for t in CHAIN {
        expect_eq(&format!("distinct {t} events"), distinct(&events, t), 1)?;
    }
    let timeline = m.timeline(order).await?;
    let ids: HashSet<String> = timeline.iter().map(|e| e["eventId"].to_string()).collect();
    expect_eq("timeline entries are unique", ids.len(), timeline.len())?;
    expect_eq("(stock, reserved)", m.stock(product).await?, (10, 0))?;
    let refused_events = m.topic_events_of(refused).await?;
    for t in REFUSED_CHAIN {
        expect_eq(
            &format!("distinct {t} events of the refused order"),
            distinct(&refused_events, t),
            1,
        )?;
    }
    expect_eq(
        "OrderCancelled for the refused order",
        distinct(&refused_events, "OrderCancelled"),
        1,
    )?;
    expect_eq(
        "StockIncreased for the refused order",
        distinct(&refused_events, "StockIncreased"),
        0,
    )
}

/// `orders` concurrent orders of one unit against `stock` units: exactly `stock` are reserved,
/// every order ends completed or cancelled, and stock + reserved stays constant.
pub async fn concurrent_orders(m: &Mall, orders: i64, stock: i64) -> Check {
    let product = m.create_product("concurrent", stock).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..orders {
        let m = m.clone();
        tasks.spawn(async move { m.place_order(product, 1).await });
    }
    let mut ids = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        ids.push(joined.map_err(|e| e.to_string())??);
    }
    let (mut completed, mut cancelled) = (0, 0);
    for id in &ids {
        let state = eventually(
            &format!("order {id} ends"),
            Duration::from_secs(60),
            || async move {
                let o = m.order(*id).await?;
                match o["state"].as_str() {
                    Some(s @ ("OrderCompleted" | "OrderCancelled")) => Ok(s.to_owned()),
                    _ => Err(o.to_string()),
                }
            },
        )
        .await?;
        if state == "OrderCompleted" {
            completed += 1;
        } else {
            cancelled += 1;
        }
    }
    expect_eq("completed orders", completed, stock.min(orders))?;
    expect_eq("cancelled orders", cancelled, orders - stock.min(orders))?;
    m.wait_stock(product, (stock - completed, completed))
        .await?;
    let (on_hand, reserved) = m.stock(product).await?;
    expect_eq("stock + reserved", on_hand + reserved, stock)
}

/// Bad input gets a JSON 4xx that names the problem; never a 500. The seed lab's own httpie
/// command (`productId=1 quantity=1`, strings) is good input.
pub async fn bad_input_gets_clear_errors(m: &Mall) -> Check {
    let seed_lab = json!({ "productId": "1", "quantity": "1", "customerId": "1@uengine.org",
                           "customerName": "홍길동", "customerAddr": "서울시" });
    let placed = m
        .expect("POST", &format!("{}/orders", m.orders), Some(seed_lab), 201)
        .await?;
    expect_eq(
        "quantity of the seed lab's order",
        placed["quantity"].as_i64(),
        Some(1),
    )?;
    let cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        (
            "POST",
            format!("{}/orders", m.orders),
            Some(json!({ "productId": 1, "quantity": 0, "customerId": "c" })),
            422,
            "quantity",
        ),
        (
            "POST",
            format!("{}/orders", m.orders),
            Some(json!({ "productId": 1, "quantity": 1 })),
            422,
            "customerId",
        ),
        (
            "POST",
            format!("{}/orders", m.orders),
            Some(json!({ "productId": "TV", "quantity": 1, "customerId": "c" })),
            422,
            "productId must be a whole number, got \"TV\"",
        ),
        (
            "POST",
            format!("{}/orders", m.orders),
            Some(json!({ "productId": 1, "quantity": "abc", "customerId": "c" })),
            422,
            "quantity must be a whole number, got \"abc\"",
        ),
        (
            "GET",
            format!("{}/orders/abc", m.orders),
            None,
            400,
            "invalid path",
        ),
        (
            "GET",
            format!("{}/orders/999999", m.orders),
            None,
            404,
            "order 999999 not found",
        ),
        (
            "GET",
            format!("{}/orders/999999/events", m.orders),
            None,
            404,
            "not found",
        ),
        (
            "PATCH",
            format!("{}/orders/1", m.orders),
            Some(json!({ "state": "OrderCompleted" })),
            422,
            "OrderCancelled",
        ),
        (
            "DELETE",
            format!("{}/orders/1", m.orders),
            None,
            405,
            "not allowed",
        ),
        (
            "GET",
            format!("{}/nope", m.orders),
            None,
            404,
            "no such endpoint",
        ),
        (
            "POST",
            format!("{}/products", m.products),
            Some(json!({ "name": " ", "price": 1, "stock": 1 })),
            422,
            "name",
        ),
        (
            "POST",
            format!("{}/products", m.products),
            Some(json!({ "name": "x", "price": 1, "stock": -1 })),
            422,
            "stock",
        ),
        (
            "PATCH",
            format!("{}/products/1", m.products),
            Some(json!({ "stok": 5 })),
            422,
            "stok",
        ),
        (
            "PATCH",
            format!("{}/products/424242", m.products),
            Some(json!({ "stock": 5 })),
            404,
            "not found",
        ),
        (
            "PATCH",
            format!("{}/deliveries/1", m.delivery),
            Some(json!({ "deliveryState": "Lost" })),
            422,
            "deliveryState",
        ),
        (
            "GET",
            format!("{}/deliveries?orderId=x", m.delivery),
            None,
            400,
            "query",
        ),
    ];
    // A NUL in any text field: PostgreSQL text cannot hold one, so every backend answers a
    // 422 naming the field (never a 503 from a failed write, never stored on SQLite only).
    let nul = "a\u{0}b";
    let order = |field: &str| {
        let mut body = json!({ "productId": 1, "quantity": 1, "customerId": "c",
                               "customerName": "n", "customerAddr": "a" });
        body[field] = json!(nul);
        body
    };
    let mut cases = cases;
    for field in [
        "customerId",
        "customerName",
        "customerAddr",
        "productId",
        "quantity",
    ] {
        let url = format!("{}/orders", m.orders);
        cases.push(("POST", url, Some(order(field)), 422, field));
    }
    let nul_cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        (
            "PATCH",
            format!("{}/orders/1", m.orders),
            Some(json!({ "state": nul })),
            422,
            "state",
        ),
        (
            "GET",
            format!("{}/orders?customerId=a%00b", m.orders),
            None,
            422,
            "customerId",
        ),
        (
            "POST",
            format!("{}/products", m.products),
            Some(json!({ "name": nul, "price": 1, "stock": 1 })),
            422,
            "name",
        ),
        (
            "POST",
            format!("{}/products", m.products),
            Some(json!({ "name": "x", "price": nul, "stock": 1 })),
            422,
            "price",
        ),
        (
            "PATCH",
            format!("{}/products/1", m.products),
            Some(json!({ "name": nul })),
            422,
            "name",
        ),
        (
            "PATCH",
            format!("{}/products/1", m.products),
            Some(json!({ "stockDelta": nul })),
            422,
            "stockDelta",
        ),
        (
            "PATCH",
            format!("{}/deliveries/1", m.delivery),
            Some(json!({ "deliveryState": nul })),
            422,
            "deliveryState",
        ),
    ];
    cases.extend(nul_cases);
    for (method, url, body, status, needle) in cases {
        let with_nul =
            url.contains("%00") || body.as_ref().is_some_and(|b| events::find_nul(b).is_some());
        let value = m.expect(method, &url, body, status).await?;
        let error = value["error"].as_str().unwrap_or_default();
        if !error.contains(needle) || (with_nul && !error.contains("NUL character")) {
            return Err(format!(
                "{method} {url}: error {error:?} should mention {needle:?}"
            ));
        }
    }
    Ok(())
}

/// Every service serves `GET /metrics` in the Prometheus text format and its figures move with
/// a saga: after one completed order, once the mall is quiet, each service applied events,
/// published some, its consumer's positions moved and its lag is 0, its outbox is empty;
/// orders counted the `POST /orders` that answered 201 (by route pattern, not path) and timed
/// the saga, products the `POST /products`.
pub async fn metrics_are_exposed(m: &Mall) -> Check {
    use crate::metric_sample as sample;
    /// The sum of every series of `name` (all label values), and how many there are.
    fn sum(text: &str, name: &str) -> (f64, usize) {
        let prefix = format!("{name}{{");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold((0.0, 0), |(total, n), v| (total + v, n + 1))
    }
    async fn scrape(http: &reqwest::Client, base: &str) -> Check<String> {
        let url = format!("{base}/metrics");
        let response = http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response
            .text()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if status != 200 || !content_type.starts_with("text/plain; version=0.0.4") {
            return Err(format!("GET {url} → {status} {content_type:?}: {text}"));
        }
        Ok(text)
    }
    let at_least = |text: &str, series: &str, min: f64| match sample(text, series) {
        Some(v) if v >= min => Ok(()),
        other => Err(format!("{series} should be ≥ {min}, is {other:?}")),
    };
    let exactly = |text: &str, series: &str, want: f64| match sample(text, series) {
        Some(v) if v == want => Ok(()),
        other => Err(format!("{series} should be {want}, is {other:?}")),
    };

    let product = m.create_product("metrics", 5).await?;
    let order = m.place_order(product, 1).await?;
    m.wait_order_state(order, "OrderCompleted").await?;
    m.wait_quiet().await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    // Orders times the saga when it reads back its own OrderCompleted, a hop after the commit.
    let orders = eventually(
        "orders timed a completed saga",
        Duration::from_secs(30),
        || async {
            let text = scrape(&http, &m.orders).await?;
            at_least(
                &text,
                r#"mall_saga_duration_seconds_count{outcome="completed"}"#,
                1.0,
            )?;
            Ok(text)
        },
    )
    .await?;
    at_least(
        &orders,
        r#"mall_http_requests_total{method="POST",route="/orders",status="201"}"#,
        1.0,
    )?;
    if orders.contains(&format!("/orders/{order}\"")) {
        return Err(format!("an order id became a route label:\n{orders}"));
    }
    // Scraped again, after the quiet mall: the figures below are final.
    let orders = scrape(&http, &m.orders).await?;
    let products = scrape(&http, &m.products).await?;
    at_least(
        &products,
        r#"mall_http_requests_total{method="POST",route="/products",status="201"}"#,
        1.0,
    )?;
    let delivery = scrape(&http, &m.delivery).await?;
    for (service, text) in [
        ("orders", &orders),
        ("products", &products),
        ("delivery", &delivery),
    ] {
        let named = |e: String| format!("{service}: {e}");
        at_least(
            text,
            r#"mall_events_consumed_total{outcome="applied"}"#,
            1.0,
        )
        .map_err(named)?;
        // Every service published events of the saga (products its catalog's too).
        at_least(text, "mall_relay_published_total", 1.0).map_err(named)?;
        exactly(text, "mall_outbox_pending_rows", 0.0).map_err(named)?;
        exactly(text, "mall_relay_lag_seconds", 0.0).map_err(named)?;
        // Per partition: read past the saga's events, nothing left behind.
        let (read, partitions) = sum(text, "mall_consumer_position");
        if partitions == 0 || read < 4.0 {
            return Err(named(format!(
                "mall_consumer_position: {read} events read on {partitions} partition(s); \
                 the saga put at least 4 on the topic"
            )));
        }
        let (lag, lagging) = sum(text, "mall_consumer_lag");
        if lagging != partitions || lag != 0.0 {
            return Err(named(format!(
                "mall_consumer_lag: {lag} on {lagging} partition(s) of {partitions}"
            )));
        }
        if service != "orders" && text.contains("mall_saga_duration_seconds") {
            return Err(format!("{service} shows orders' saga durations: {text}"));
        }
    }
    Ok(())
}
