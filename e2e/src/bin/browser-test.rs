//! The dashboard in a real browser (`scripts/test.sh` runs it): a fresh broker and the
//! three service binaries on free ports (orders told where products and delivery are), then
//! headless Chromium, driven through chromedriver, uses orders' page at `/` as a person would:
//! places an order, watches it complete, cancels it (202, then OrderCancelled), opens its
//! timeline and sees the compensation, sees the stock restored, completes a delivery as the
//! courier, reads an error, finds a poison message among the dead letters, pages the orders
//! list, stays at the newest 200 rows through a burst of a thousand orders, and last, with
//! orders restarted on a 3 s saga timeout and delivery frozen, sees an order time out, its
//! timeline name the timeout, and the header show delivery not answering. Every check
//! reads the page's DOM (`data-testid`s); the page polls nothing, so what changes on it
//! arrived through the event stream. Screenshots the compensated order's timeline (into the
//! run directory, or where `--screenshot` says: `docs/timeline.png` refreshes the README's).
//! Stops everything it started; keeps the logs (services, broker, chromedriver, a screenshot of
//! the page) of a failed run. Prints `N passed, N failed` last.
//!
//! Usage: `browser-test --bin-dir target/debug --kafka .tools/kafka-4.1.1/libs
//!         [--chromium /usr/bin/chromium] [--chromedriver /usr/bin/chromedriver]
//!         [--screenshot docs/timeline.png] [--load 1000] [--keep]`
//! (`--load N`: how many orders the burst places, 0 skips it; `--keep`: keep the run
//! directory, with a screenshot of the whole page, also when every check passed)

use e2e::broker::BrokerKind;
use e2e::browser::{Chromedriver, open_browser};
use e2e::stack::{Stack, argument};
use e2e::{Check, Mall, eventually};
use fantoccini::{Client, Locator};
use serde_json::{Value, json};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long the page may take to show what the services did.
const UI_TIMEOUT: Duration = Duration::from_secs(30);

/// The dashboard as the test sees it: reads through the DOM, acts through WebDriver.
struct Page {
    client: Client,
}

fn css(testid: &str) -> String {
    format!("[data-testid=\"{testid}\"]")
}

impl Page {
    async fn open(&self, url: &str) -> Check {
        self.client
            .goto(url)
            .await
            .map_err(|e| format!("open {url}: {e}"))
    }

    /// `textContent` of the first element matching `selector`, or `None`.
    async fn text_of(&self, selector: &str) -> Check<Option<String>> {
        let value = self
            .client
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
                vec![json!(selector)],
            )
            .await
            .map_err(|e| format!("reading {selector}: {e}"))?;
        Ok(value.as_str().map(str::to_owned))
    }

    /// The first element's attribute, or `None`.
    async fn attr_of(&self, selector: &str, attr: &str) -> Check<Option<String>> {
        let value = self
            .client
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
                vec![json!(selector), json!(attr)],
            )
            .await
            .map_err(|e| format!("reading {selector}: {e}"))?;
        Ok(value.as_str().map(str::to_owned))
    }

    async fn count(&self, selector: &str) -> Check<usize> {
        let value = self
            .client
            .execute(
                "return document.querySelectorAll(arguments[0]).length;",
                vec![json!(selector)],
            )
            .await
            .map_err(|e| format!("counting {selector}: {e}"))?;
        Ok(value.as_u64().unwrap_or_default() as usize)
    }

    /// `data-id` of every row of a table body, top to bottom.
    async fn row_ids(&self, tbody: &str) -> Check<Vec<i64>> {
        let value = self
            .client
            .execute(
                "return [...document.querySelectorAll(arguments[0] + ' > tr[data-id]')].map(r => Number(r.dataset.id));",
                vec![json!(css(tbody))],
            )
            .await
            .map_err(|e| format!("reading {tbody}: {e}"))?;
        Ok(value
            .as_array()
            .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default())
    }

    /// Opens order `id`'s timeline as a person does: a click on its row (not on its button).
    async fn open_timeline(&self, id: i64) -> Check {
        self.click_css(&format!(
            "{} td:first-child",
            css(&format!("order-row-{id}"))
        ))
        .await
    }

    /// Saves a screenshot of the timeline panel as `file` (PNG).
    async fn save_timeline(&self, file: &Path) -> Check {
        let png = self
            .client
            .find(Locator::Css(&css("timeline-panel")))
            .await
            .map_err(|e| e.to_string())?
            .screenshot()
            .await
            .map_err(|e| format!("screenshot: {e}"))?;
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(file, &png).map_err(|e| format!("{}: {e}", file.display()))?;
        println!("    saved {} ({} KB)", file.display(), png.len() / 1024);
        Ok(())
    }

    /// Waits until the first element matching `selector` has `attr` = `expected`.
    async fn wait_attr(&self, selector: &str, attr: &str, expected: &str) -> Check {
        eventually(
            &format!("{selector} has {attr}={expected:?}"),
            UI_TIMEOUT,
            || async {
                match self.attr_of(selector, attr).await? {
                    Some(value) if value == expected => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// Waits until the element with `testid` reads `expected`.
    async fn wait_text(&self, testid: &str, expected: &str) -> Check {
        let selector = css(testid);
        eventually(
            &format!("{testid} reads {expected:?}"),
            UI_TIMEOUT,
            || async {
                match self.text_of(&selector).await? {
                    Some(text) if text == expected => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// Waits until `selector` matches something.
    async fn wait_for(&self, selector: &str) -> Check {
        eventually(
            &format!("{selector} is on the page"),
            UI_TIMEOUT,
            || async {
                if self.count(selector).await? > 0 {
                    Ok(())
                } else {
                    Err("not there".into())
                }
            },
        )
        .await
    }

    async fn click(&self, testid: &str) -> Check {
        self.click_css(&css(testid)).await
    }

    /// Clicks the first element matching `selector`, again if the page re-rendered it between
    /// finding and clicking (rows are rendered anew on each change).
    async fn click_css(&self, selector: &str) -> Check {
        eventually(
            &format!("{selector} can be clicked"),
            UI_TIMEOUT,
            || async {
                self.client
                    .find(Locator::Css(selector))
                    .await
                    .map_err(|e| format!("finding {selector}: {e}"))?
                    .click()
                    .await
                    .map_err(|e| format!("clicking {selector}: {e}"))
            },
        )
        .await
    }

    async fn type_into(&self, testid: &str, text: &str) -> Check {
        let field = self
            .client
            .find(Locator::Css(&css(testid)))
            .await
            .map_err(|e| format!("finding {testid}: {e}"))?;
        field
            .clear()
            .await
            .map_err(|e| format!("clearing {testid}: {e}"))?;
        field
            .send_keys(text)
            .await
            .map_err(|e| format!("typing into {testid}: {e}"))
    }

    /// The newest message (the list is newest first) matching `filter`, a CSS attribute filter.
    async fn wait_message(&self, filter: &str) -> Check<String> {
        let selector = format!("{}{filter}", css("message"));
        self.wait_for(&selector).await?;
        Ok(self.text_of(&selector).await?.unwrap_or_default())
    }

    /// Every message on the page, for a failure report.
    async fn messages(&self) -> String {
        self.client
            .execute(
                "return [...document.querySelectorAll('[data-testid=\"message\"]')].map(m => m.textContent).join('\\n');",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

fn number(text: Option<String>, what: &str) -> Check<i64> {
    text.as_deref()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| format!("{what} is not a number: {text:?}"))
}

/// What the scenarios share: the order placed and cancelled from the page.
#[derive(Default)]
struct Run {
    order: Option<i64>,
    stock_before: Option<i64>,
}

impl Run {
    fn order(&self) -> Check<i64> {
        self.order
            .ok_or_else(|| "no order was placed from the page (see above)".into())
    }
}

async fn page_loads(page: &Page, m: &Mall) -> Check {
    page.open(&format!("{}/", m.orders)).await?;
    page.wait_attr(&css("stream-status"), "data-state", "live")
        .await?;
    page.wait_for(&css("product-row-1")).await?;
    for service in ["orders", "products", "delivery"] {
        page.wait_attr(&css(&format!("health-{service}")), "data-state", "ok")
            .await?;
    }
    let products = page.attr_of("body", "data-products").await?;
    if products.as_deref() != Some(m.products.as_str()) {
        return Err(format!(
            "the page uses products at {products:?}, not {} (/dashboard/config)",
            m.products
        ));
    }
    Ok(())
}

/// Places an order of one `product` through the page's form; its id and the page's message.
async fn place_with_the_form(page: &Page, product: i64, customer: &str) -> Check<(i64, String)> {
    page.wait_for(&css(&format!("product-row-{product}")))
        .await?;
    page.client
        .find(Locator::Css(&css("place-product")))
        .await
        .map_err(|e| e.to_string())?
        .select_by_value(&product.to_string())
        .await
        .map_err(|e| format!("choosing product {product}: {e}"))?;
    page.type_into("place-quantity", "1").await?;
    page.type_into("place-customer", customer).await?;
    page.click("place-submit").await?;
    let filter = format!("[data-status=\"201\"][data-customer=\"{customer}\"]");
    let text = page.wait_message(&filter).await?;
    let id = number(
        page.attr_of(&format!("{}{filter}", css("message")), "data-order-id")
            .await?,
        "the placed order's id",
    )?;
    Ok((id, text))
}

async fn place_from_the_page(page: &Page, m: &Mall, run: &mut Run) -> Check {
    let stock = number(page.text_of(&css("product-stock-1")).await?, "TV's stock")?;
    run.stock_before = Some(stock);
    let (id, text) = place_with_the_form(page, 1, "browser@12st.mall").await?;
    println!("    placed order {id}: {text}");
    run.order = Some(id);
    page.wait_text(&format!("order-state-{id}"), "OrderCompleted")
        .await?;
    page.wait_text(&format!("order-stock-reserved-{id}"), "✓")
        .await?;
    page.wait_text(&format!("order-delivery-{id}"), "DeliveryStarted")
        .await?;
    page.wait_text("product-stock-1", &(stock - 1).to_string())
        .await?;
    page.wait_text("product-reserved-1", "1").await?;
    // The REST API agrees with what the page shows.
    let order = m.order(id).await?;
    if order["state"] != "OrderCompleted" || order["customerId"] != "browser@12st.mall" {
        return Err(format!("orders says {order}"));
    }
    let delivery = m.delivery_of(id).await?;
    page.wait_text(
        &format!("delivery-state-{}", e2e::field_i64(&delivery, "id")?),
        "DeliveryStarted",
    )
    .await
}

async fn cancel_from_the_page(page: &Page, run: &Run) -> Check {
    let id = run.order()?;
    page.click(&format!("cancel-order-{id}")).await?;
    let text = page
        .wait_message(&format!("[data-status=\"202\"][data-order-id=\"{id}\"]"))
        .await?;
    if !text.contains("cancel requested") {
        return Err(format!("the 202 message says {text:?}"));
    }
    println!("    {text}");
    page.wait_text(&format!("order-state-{id}"), "OrderCancelled")
        .await?;
    page.wait_text(&format!("order-delivery-{id}"), "DeliveryCancelled")
        .await
}

async fn timeline_shows_the_compensation(page: &Page, run: &Run, screenshot: &Path) -> Check {
    let id = run.order()?;
    page.open_timeline(id).await?;
    let restocked = format!("{} [data-event-type=\"StockIncreased\"]", css("timeline"));
    page.wait_for(&restocked).await?;
    for (what, selector) in [
        (
            "the timeline is order's",
            format!("{}[data-order-id=\"{id}\"]", css("timeline")),
        ),
        (
            "StockIncreased is marked as a compensation",
            format!("{restocked}[data-compensation=\"true\"][data-initiator=\"orders\"]"),
        ),
        (
            "an arrow leads to StockIncreased",
            format!(
                "{} [data-testid=\"timeline-hop\"][data-to=\"StockIncreased\"]",
                css("timeline")
            ),
        ),
        (
            "the customer's request starts the chain",
            format!(
                "{} [data-event-type=\"OrderCancelRequested\"][data-initiator=\"orders\"]",
                css("timeline")
            ),
        ),
    ] {
        if page.count(&selector).await? == 0 {
            return Err(format!("{what}: nothing matches {selector}"));
        }
    }
    let marks = page
        .count(&format!(
            "{} [data-testid=\"timeline-event\"]",
            css("timeline")
        ))
        .await?;
    let hops = page
        .count(&format!(
            "{} [data-testid=\"timeline-hop\"]",
            css("timeline")
        ))
        .await?;
    let lanes = page
        .count(&format!("{} [data-lane]", css("timeline")))
        .await?;
    if lanes != 3 || hops + 2 > marks {
        return Err(format!("{lanes} lanes, {marks} events, {hops} arrows"));
    }
    let initiator = page.text_of(&css("timeline-initiator")).await?;
    if initiator.as_deref() != Some("orders") {
        return Err(format!("the initiator shown is {initiator:?}"));
    }
    let summary = page
        .text_of(&css("timeline-summary"))
        .await?
        .unwrap_or_default();
    println!("    timeline: {summary}; {marks} events, {hops} arrows");
    page.save_timeline(screenshot).await
}

async fn stock_restored_in_the_catalog(page: &Page, m: &Mall, run: &Run) -> Check {
    let before = run
        .stock_before
        .ok_or("the stock before the order is unknown")?;
    page.wait_text("product-stock-1", &before.to_string())
        .await?;
    page.wait_text("product-reserved-1", "0").await?;
    let (stock, reserved) = m.stock(1).await?;
    if (stock, reserved) != (before, 0) {
        return Err(format!("products says stock {stock}, reserved {reserved}"));
    }
    Ok(())
}

async fn errors_are_shown(page: &Page, run: &Run) -> Check {
    let id = run.order()?;
    page.click(&format!("cancel-order-{id}")).await?;
    let text = page
        .wait_message(&format!(
            "[data-kind=\"error\"][data-status=\"409\"][data-order-id=\"{id}\"]"
        ))
        .await?;
    if !text.contains("cancel") {
        return Err(format!(
            "the 409 message does not give the reason: {text:?}"
        ));
    }
    println!("    {text}");
    Ok(())
}

/// An order placed elsewhere appears on its own; the courier completes its delivery from the
/// page; products settles the reservation.
async fn courier_completes_a_delivery(page: &Page, m: &Mall) -> Check {
    let product = m.create_product("browser-courier", 5).await?;
    let id = m.place_order(product, 2).await?;
    page.wait_text(&format!("order-state-{id}"), "OrderCompleted")
        .await?;
    let delivery = e2e::field_i64(&m.delivery_of(id).await?, "id")?;
    // Delivery learns of OrderCompleted silently; the page looks again and shows it.
    page.wait_text(&format!("delivery-confirmed-{delivery}"), "✓")
        .await?;
    page.click(&format!("delivery-complete-{delivery}")).await?;
    page.wait_message(&format!(
        "[data-status=\"200\"][data-delivery-id=\"{delivery}\"]"
    ))
    .await?;
    page.wait_text(&format!("delivery-state-{delivery}"), "DeliveryCompleted")
        .await?;
    page.wait_text(&format!("order-delivery-{id}"), "DeliveryCompleted")
        .await?;
    // The catalog learnt of the product through its first order's events.
    page.wait_text(&format!("product-stock-{product}"), "3")
        .await?;
    page.wait_text(&format!("product-delivered-{product}"), "2")
        .await
}

async fn dead_letters_are_listed(page: &Page, m: &Mall) -> Check {
    e2e::publish_raw(
        &m.brokers,
        &m.topic,
        "poison-browser",
        "this is not an event",
    )
    .await?;
    eventually(
        "every service's dead letter is listed",
        UI_TIMEOUT,
        || async {
            page.click("dead-letters-refresh").await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut missing = Vec::new();
            for service in ["orders", "products", "delivery"] {
                let row = format!("tr[data-service=\"{service}\"]");
                let reason = page.text_of(&format!("{row} td.message")).await?;
                if reason.is_none_or(|r| r.is_empty()) {
                    missing.push(service);
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("none from {missing:?}"))
            }
        },
    )
    .await?;
    let reason = page
        .text_of("tr[data-service=\"orders\"] td.message")
        .await?
        .unwrap_or_default();
    println!("    orders parked it: {reason}");
    // The discard button: it asks why, and the record keeps the reason.
    let parked = m
        .expect(
            "GET",
            &format!("{}/dead-letters?status=parked&limit=1000", m.orders),
            None,
            200,
        )
        .await?;
    let id = parked
        .as_array()
        .and_then(|l| l.last())
        .and_then(|d| d["id"].as_i64())
        .ok_or(format!("orders lists nothing parked: {parked}"))?;
    page.click(&format!("discard-orders-{id}")).await?;
    page.client
        .send_alert_text("poison from the browser test")
        .await
        .map_err(|e| format!("answering the discard prompt: {e}"))?;
    page.client
        .accept_alert()
        .await
        .map_err(|e| format!("accepting the discard prompt: {e}"))?;
    page.wait_text(&format!("dead-letter-status-orders-{id}"), "discarded")
        .await?;
    let letter = m
        .expect("GET", &format!("{}/dead-letters/{id}", m.orders), None, 200)
        .await?;
    let resolution = letter["resolution"].as_str().unwrap_or_default();
    if !resolution.contains("poison from the browser test") {
        return Err(format!("the discard's record: {letter}"));
    }
    Ok(())
}

/// With a window of 10 rows, 15 new orders leave 10 rows, the newest on top; older pages back.
async fn the_orders_list_is_a_bounded_window(page: &Page, m: &Mall) -> Check {
    page.open(&format!("{}/?window=10", m.orders)).await?;
    page.wait_for(&css("product-row-1")).await?;
    page.wait_attr(&css("stream-status"), "data-state", "live")
        .await?;
    let product = m.create_product("browser-window", 100).await?;
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(m.place_order(product, 1).await?);
    }
    let newest = *ids.last().ok_or("no orders")?;
    page.wait_text(&format!("order-state-{newest}"), "OrderCompleted")
        .await?;
    let rows = page.row_ids("order-rows").await?;
    let expected: Vec<i64> = (newest - 9..=newest).rev().collect();
    if rows != expected {
        return Err(format!("live window shows {rows:?}, expected {expected:?}"));
    }
    page.click("orders-older").await?;
    let older = eventually("the older page is shown", UI_TIMEOUT, || async {
        let rows = page.row_ids("order-rows").await?;
        if rows.first().is_some_and(|first| *first < newest - 9) {
            Ok(rows)
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await?;
    let expected: Vec<i64> = (newest - 19..=newest - 10)
        .rev()
        .filter(|id| *id > 0)
        .collect();
    if older != expected {
        return Err(format!("older page shows {older:?}, expected {expected:?}"));
    }
    page.click("orders-newest").await?;
    page.wait_for(&css(&format!("order-row-{newest}"))).await?;
    let rows = page.count(&format!("{} > tr", css("order-rows"))).await?;
    if rows != 10 {
        return Err(format!("{rows} rows after going back to the newest"));
    }
    Ok(())
}

/// Many orders placed while the page is open (20 at a time): once the sagas are over, the
/// page shows exactly the newest 200 orders, each in the state the REST API gives; a fresh
/// load of the page shows them quickly.
async fn many_orders(page: &Page, m: &Mall, count: usize) -> Check {
    page.open(&format!("{}/", m.orders)).await?;
    page.wait_attr(&css("stream-status"), "data-state", "live")
        .await?;
    let product = m.create_product("browser-load", 1_000_000).await?;
    let started = Instant::now();
    let mut placing = Vec::new();
    for _ in 0..20 {
        let m = m.clone();
        let each = count.div_ceil(20);
        placing.push(tokio::spawn(async move {
            let (mut ids, mut refused) = (Vec::new(), 0);
            for _ in 0..each {
                // Faster than the mall ends sagas: orders answers 503 past its pending
                // bound, and the placers come back a second later, as a client should.
                let (id, busy) = m.place_order_retrying(product, 1).await?;
                ids.push(id);
                refused += busy;
            }
            Ok::<_, String>((ids, refused))
        }));
    }
    let (mut newest, mut refused) = (0, 0);
    for task in placing {
        let (ids, busy) = task.await.map_err(|e| e.to_string())??;
        refused += busy;
        for id in ids {
            newest = newest.max(id);
        }
    }
    let placed = started.elapsed();
    println!("    {count} orders placed; answered 503 (busy) {refused} times on the way");
    let window = newest - 199;
    let states = || async {
        let list = m
            .expect(
                "GET",
                &format!("{}/orders?after={}&limit=200", m.orders, window - 1),
                None,
                200,
            )
            .await?;
        let mut states = Vec::new();
        for o in list.as_array().ok_or("not a list")? {
            states.push((
                e2e::field_i64(o, "id")?,
                o["state"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        states.reverse();
        Ok::<_, String>(states)
    };
    let rest = eventually(
        "every saga of the burst is over",
        Duration::from_secs(180),
        || async {
            let states = states().await?;
            match states.iter().find(|(_, state)| state == "OrderPlaced") {
                Some((id, _)) => Err(format!("order {id} is still pending")),
                None => Ok(states),
            }
        },
    )
    .await?;
    let over = started.elapsed();
    let on_page = || async {
        let value = page
            .client
            .execute(
                "return [...document.querySelectorAll('[data-testid=\"order-rows\"] > tr[data-id]')]\
                 .map(r => [Number(r.dataset.id), r.dataset.state]);",
                vec![],
            )
            .await
            .map_err(|e| format!("reading the orders: {e}"))?;
        let rows: Vec<(i64, String)> = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok::<_, String>(rows)
    };
    eventually(
        "the page shows the newest 200 orders as the REST API does",
        Duration::from_secs(60),
        || async {
            let shown = on_page().await?;
            if shown == rest {
                return Ok(());
            }
            let differ = shown
                .iter()
                .zip(&rest)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("page {a:?}, REST {b:?}"));
            Err(format!(
                "{} rows; first difference: {differ:?}",
                shown.len()
            ))
        },
    )
    .await?;
    let shown = started.elapsed();
    let reload = Instant::now();
    page.open(&format!("{}/", m.orders)).await?;
    let newest_state = &rest[0].1;
    page.wait_text(&format!("order-state-{newest}"), newest_state)
        .await?;
    let loaded = reload.elapsed();
    let rows = page.count(&format!("{} > tr", css("order-rows"))).await?;
    let snapshot = page
        .attr_of("body", "data-loaded-ms")
        .await?
        .unwrap_or_default();
    println!(
        "    {count} orders placed in {:.1} s, all sagas over after {:.1} s, the page agreed \
         after {:.1} s; a fresh load shows the newest {rows} in {:.2} s (lists read {snapshot} ms \
         after the page started)",
        placed.as_secs_f64(),
        over.as_secs_f64(),
        shown.as_secs_f64(),
        loaded.as_secs_f64()
    );
    if rows != 200 || loaded > Duration::from_secs(10) {
        return Err(format!(
            "{rows} rows after a load of {:.1} s",
            loaded.as_secs_f64()
        ));
    }
    Ok(())
}

/// Orders restarted with a 3 s saga timeout and delivery frozen: an order placed from the page
/// reserves its stock but stays pending, orders' timer cancels it, products restocks; delivery,
/// thawed, starts the delivery late and calls it off. The timeline names the timeout.
async fn a_stuck_order_times_out(stack: &mut Stack, page: &Page, m: &Mall) -> Check {
    let product = m.create_product("browser-timeout", 5).await?;
    // The page learns of a product through orders' events; this one has none yet.
    page.click("catalog-refresh").await?;
    page.wait_for(&css(&format!("product-row-{product}")))
        .await?;
    stack.set_env("orders", "SAGA_TIMEOUT_S", "3");
    stack.sigkill("orders")?;
    stack.start_service("orders")?;
    m.wait_healthy().await?;
    stack.sigstop("delivery")?;
    let frozen = stuck_order_ends(page, m, product).await;
    // The header shows the frozen service: it accepts connections but answers nothing.
    let shown = page
        .wait_attr(&css("health-delivery"), "data-state", "unreachable")
        .await;
    stack.sigcont("delivery")?;
    let id = frozen?;
    shown?;
    page.wait_attr(&css("health-delivery"), "data-state", "ok")
        .await?;
    page.wait_text(&format!("order-delivery-{id}"), "DeliveryCancelled")
        .await?;
    page.wait_text(&format!("product-stock-{product}"), "5")
        .await?;
    page.wait_text(&format!("product-reserved-{product}"), "0")
        .await?;
    page.open_timeline(id).await?;
    let timeline = css("timeline");
    // The late delivery is in the timeline, and its cancellation, which ends it.
    page.wait_for(&format!(
        "{timeline}[data-order-id=\"{id}\"] [data-event-type=\"DeliveryCancelled\"]"
    ))
    .await?;
    for (what, selector, expected) in [
        (
            "the cancel is marked as started by the saga timeout",
            format!(
                "{timeline} [data-event-type=\"OrderCancelled\"][data-trigger=\"timer\"][data-initiator=\"orders\"]"
            ),
            1,
        ),
        (
            "the mark says so in words",
            format!("{timeline} [data-event-type=\"OrderCancelled\"] .via.timer"),
            1,
        ),
        (
            "products restocked for it",
            format!("{timeline} [data-event-type=\"StockIncreased\"][data-initiator=\"orders\"]"),
            1,
        ),
        (
            "the late DeliveryStarted is shown",
            format!("{timeline} [data-event-type=\"DeliveryStarted\"]"),
            1,
        ),
        (
            "the order never completed",
            format!("{timeline} [data-event-type=\"OrderCompleted\"]"),
            0,
        ),
        (
            "no event claims an HTTP request started the cancel",
            format!("{timeline} [data-event-type=\"OrderCancelled\"][data-trigger=\"http\"]"),
            0,
        ),
    ] {
        let found = page.count(&selector).await?;
        if found != expected {
            return Err(format!("{what}: {found} match {selector}"));
        }
    }
    let label = page
        .text_of(&format!(
            "{timeline} [data-event-type=\"OrderCancelled\"] .via.timer"
        ))
        .await?;
    if label.as_deref() != Some("saga timeout") {
        return Err(format!("the mark's label reads {label:?}"));
    }
    let summary = page
        .text_of(&css("timeline-summary"))
        .await?
        .unwrap_or_default();
    if !summary.contains("saga timeout") || !summary.contains("SAGA_TIMEOUT_S") {
        return Err(format!(
            "the summary does not name the timeout: {summary:?}"
        ));
    }
    println!("    timeline: {summary}");
    page.save_timeline(&stack.dir().join("timeout-timeline.png"))
        .await
}

/// With delivery frozen: places the order from the page and waits until orders' timer cancels
/// it. The order's id.
async fn stuck_order_ends(page: &Page, m: &Mall, product: i64) -> Check<i64> {
    let (id, text) = place_with_the_form(page, product, "timeout@12st.mall").await?;
    println!("    placed order {id} with delivery frozen: {text}");
    page.wait_text(&format!("order-stock-reserved-{id}"), "✓")
        .await?;
    page.wait_text(&format!("order-state-{id}"), "OrderCancelled")
        .await?;
    let order = m.order(id).await?;
    let message = order["stateMessage"].as_str().unwrap_or_default();
    if !message.contains("SAGA_TIMEOUT_S") {
        return Err(format!("the cancelled order's stateMessage: {message:?}"));
    }
    println!("    {message}");
    Ok(id)
}

async fn run(stack: &mut Stack, page: &Page, screenshot: &Path, load: usize) -> (usize, usize) {
    let m = stack.mall();
    if let Err(e) = m.wait_healthy().await {
        println!("FAIL start-up: {e}");
        return (0, 1);
    }
    let (mut passed, mut failed) = (0, 0);
    let mut shared = Run::default();
    macro_rules! scenario {
        ($name:literal, $run:expr) => {{
            let started = Instant::now();
            println!("...  {}", $name);
            let result: Check = $run.await;
            let took = started.elapsed().as_secs_f64();
            match result {
                Ok(()) => {
                    passed += 1;
                    println!("ok   {} ({took:.1} s)", $name);
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {} ({took:.1} s): {e}", $name);
                    println!("     messages on the page:\n{}", page.messages().await);
                }
            }
        }};
    }
    scenario!(
        "the page loads: stream live, catalog listed",
        page_loads(page, &m)
    );
    scenario!(
        "place an order from the page; it completes live",
        place_from_the_page(page, &m, &mut shared)
    );
    scenario!(
        "cancel it from the page: 202, then OrderCancelled",
        cancel_from_the_page(page, &shared)
    );
    scenario!(
        "its timeline shows the compensation with its initiator",
        timeline_shows_the_compensation(page, &shared, screenshot)
    );
    scenario!(
        "the catalog shows the stock restored",
        stock_restored_in_the_catalog(page, &m, &shared)
    );
    scenario!(
        "a refused cancel shows the error body (409)",
        errors_are_shown(page, &shared)
    );
    scenario!(
        "the courier completes a delivery from the page",
        courier_completes_a_delivery(page, &m)
    );
    scenario!(
        "dead letters of all three services are listed with their reason; one discarded from the page",
        dead_letters_are_listed(page, &m)
    );
    scenario!(
        "the orders list is a bounded window with paging",
        the_orders_list_is_a_bounded_window(page, &m)
    );
    if load > 0 {
        scenario!(
            "a burst of orders keeps the page bounded and loading fast",
            many_orders(page, &m, load)
        );
    }
    // Last: it restarts orders with a short saga timeout, which a burst would run into.
    scenario!(
        "a stuck order times out; its timeline names the timeout",
        a_stuck_order_times_out(stack, page, &m)
    );
    (passed, failed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: browser-test --bin-dir <dir with orders, products, delivery> \
                 (--kafka <dir of Kafka's jars> | --tansu <tansu binary>) \
                 [--chromium /usr/bin/chromium] [--chromedriver /usr/bin/chromedriver] \
                 [--screenshot docs/timeline.png] [--load 1000] [--keep]";
    let (Some(bin_dir), broker) = (argument(&args, "--bin-dir"), BrokerKind::from_args(&args))
    else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let broker = match broker {
        Ok(b) => b,
        Err(e) => {
            eprintln!("browser-test: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    let chromium = argument(&args, "--chromium").unwrap_or_else(|| "/usr/bin/chromium".into());
    let chromedriver =
        argument(&args, "--chromedriver").unwrap_or_else(|| "/usr/bin/chromedriver".into());
    // The README's picture is refreshed only when asked (`--screenshot docs/timeline.png`);
    // by default the screenshot stays in the run directory.
    let screenshot_arg = argument(&args, "--screenshot");
    let load = match argument(&args, "--load").map(|n| n.to_string_lossy().parse::<usize>()) {
        None => 1000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("--load: {e}");
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
    for (what, path) in [("--chromium", &chromium), ("--chromedriver", &chromedriver)] {
        if !path.exists() {
            println!(
                "FAIL start-up: {what} {} does not exist (apt-get install chromium chromium-driver)",
                path.display()
            );
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    }
    let dir = match tempfile::Builder::new().prefix("mall-browser-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("cannot create a run directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "browser test: logs and databases in {}",
        dir.path().display()
    );
    let started = Instant::now();
    let screenshot = screenshot_arg.unwrap_or_else(|| dir.path().join("timeline.png"));
    let (passed, failed) = tokio::select! {
        counts = start_and_run(dir.path(), &bin_dir, &broker, &chromium, &chromedriver, &screenshot, load) => counts,
        _ = kafka::shutdown_signal() => {
            println!("interrupted");
            (0, 1)
        }
    };
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    if failed > 0 || args.iter().any(|a| a == "--keep") {
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

async fn start_and_run(
    dir: &Path,
    bin_dir: &Path,
    broker: &BrokerKind,
    chromium: &Path,
    chromedriver: &Path,
    screenshot: &Path,
    load: usize,
) -> (usize, usize) {
    // The burst must not meet the saga timeout on a busy machine: this test is about the page.
    let env = vec![("orders", "SAGA_TIMEOUT_S".to_owned(), "600".to_owned())];
    let mut stack = match Stack::start_with(dir, bin_dir, broker, env) {
        Ok(stack) => stack,
        Err(e) => {
            println!("FAIL start-up: {e}");
            return (0, 1);
        }
    };
    let driver = match Chromedriver::start(chromedriver, dir).await {
        Ok(driver) => driver,
        Err(e) => {
            println!("FAIL start-up: {e}");
            return (0, 1);
        }
    };
    let client = match open_browser(&driver, chromium, &[]).await {
        Ok(client) => client,
        Err(e) => {
            println!("FAIL start-up: {e}");
            return (0, 1);
        }
    };
    let page = Page { client };
    let (passed, failed) = run(&mut stack, &page, screenshot, load).await;
    // The whole page as the run left it, kept with the logs (on failure, or with --keep).
    if let Ok(png) = page.client.screenshot().await {
        let _ = std::fs::write(dir.join("page.png"), png);
    }
    // Closing the session ends Chromium; then chromedriver and the mall stop.
    if let Err(e) = page.client.close().await {
        println!("     closing the browser: {e}");
    }
    drop(driver);
    stack.stop();
    (passed, failed)
}
