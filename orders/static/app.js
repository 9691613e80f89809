// The 12st Mall dashboard. Plain JS, no build step, nothing loaded from elsewhere.
//
// Live lists: orders (a window of at most WINDOW rows, the newest by default, paged with
// older/newer), the catalog (products), deliveries (a window too) and the dead letters of all
// three services. Orders' GET /events/stream (server-sent events) says which order changed;
// the page then re-reads only that order, and that order's product and delivery when the
// event can have changed them. Nothing is polled.
'use strict';

const params = new URLSearchParams(location.search);
const WINDOW = clamp(parseInt(params.get('window') || '200', 10), 5, 1000);
const DEAD_LETTERS = 50; // per service
const MESSAGES = 30;

const urls = { orders: location.origin, products: null, delivery: null };
let ready = false; // the first snapshot is loaded; events before it are replayed after it
const early = [];

function clamp(n, lo, hi) { return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : hi; }
function $(selector, root = document) { return root.querySelector(selector); }
function testid(id) { return `[data-testid="${id}"]`; }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c);
  }
  return node;
}

// ---- HTTP: every non-2xx answer becomes an ApiError carrying the body's "error" ----

// The bearer token this tab sends (the mall's MALL_TOKENS); kept for the tab only. A mall
// without tokens needs none.
const token = sessionStorage.getItem('mall-token') || '';

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(method, url, body, timeoutMs) {
  const init = { method, headers: {} };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (timeoutMs) init.signal = AbortSignal.timeout(timeoutMs);
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, `${method} ${url}: ${e.message} (is the service running?)`);
  }
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!response.ok) {
    const why = (json && json.error) || text || response.statusText;
    if (response.status === 401) document.body.dataset.auth = 'needed';
    throw new ApiError(response.status, response.status === 401 ? `${why}: enter a token above` : why);
  }
  return { status: response.status, body: json };
}

// ---- messages: the answer to every action, errors with their body ----

function say(kind, text, attrs = {}) {
  const list = $(testid('message-list'));
  const now = new Date().toLocaleTimeString();
  list.prepend(el('li', { class: kind, 'data-testid': 'message', 'data-kind': kind, ...attrs },
    el('time', { text: now }), ' ', text));
  while (list.children.length > MESSAGES) list.lastElementChild.remove();
}

function failure(what, e, attrs = {}) {
  const status = e instanceof ApiError && e.status ? `${e.status} ` : '';
  say('error', `${what}: ${status}${e.message}`, { 'data-status': e.status ?? '', ...attrs });
}

// ---- paged lists: ids ascending, ?after=<id>&limit=<n> ----

async function firstIdAfter(base, after) {
  const { body } = await call('GET', `${base}?after=${after}&limit=1`);
  return body.length ? body[0].id : null;
}

// The largest id of a paged list in O(log n) requests of one row: gallop, then bisect.
async function newestId(base) {
  const first = await firstIdAfter(base, 0);
  if (first === null) return 0;
  let lo = first - 1; // some id > lo exists
  let hi = Math.max(first, 1);
  for (;;) {
    const id = await firstIdAfter(base, hi);
    if (id === null) break; // none > hi
    lo = id - 1;
    hi = id * 2;
  }
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    const id = await firstIdAfter(base, mid);
    if (id === null) hi = mid; else lo = id - 1;
  }
  return hi;
}

// A window of at most WINDOW rows of a paged list, newest first, keyed by id. `live`: it
// shows the newest rows, so new ones are added at the top and the oldest dropped.
class ListWindow {
  // `anchor()`: an id at most the newest (where reading the newest rows starts), or null to
  // search for the newest.
  constructor({ name, base, tbody, render, anchor }) {
    Object.assign(this, { name, base, tbody, render, anchor });
    this.rows = new Map(); // id → { item, tr }
    this.live = true;
    this.newerSeen = false;
  }

  get minId() { let m = Infinity; for (const id of this.rows.keys()) m = Math.min(m, id); return m; }
  get maxId() { let m = 0; for (const id of this.rows.keys()) m = Math.max(m, id); return m; }

  // Whether a row with this id belongs in the window as it is.
  accepts(id) {
    if (this.rows.has(id)) return true;
    if (this.live) return this.rows.size < WINDOW || id > this.minId;
    return id > this.minId && id < this.maxId;
  }

  replace(items, live) {
    const previous = this.rows;
    this.live = live;
    this.newerSeen = false;
    this.rows = new Map();
    this.tbody.replaceChildren();
    for (let item of items.sort((a, b) => b.id - a.id).slice(0, WINDOW)) {
      // A row the stream refreshed while this page was being read stays as it is.
      const known = previous.get(item.id);
      if (known && isOlderCopy(item, known.item)) item = known.item;
      const tr = this.render(item);
      this.rows.set(item.id, { item, tr });
      this.tbody.append(tr);
    }
    this.showRange();
  }

  // Adds or updates a row if it belongs in the window; returns whether it is shown. `quiet`:
  // no highlight (many rows at once).
  upsert(item, quiet = false) {
    const known = this.rows.get(item.id);
    if (known) {
      if (isOlderCopy(item, known.item)) return true; // an answer overtaken by a later one
      const tr = this.render(item);
      tr.className = known.tr.className.replace(/\bflash\b/, '').trim();
      known.tr.replaceWith(tr);
      known.item = item;
      known.tr = tr;
      if (!quiet) flash(tr);
      return true;
    }
    if (!this.accepts(item.id)) {
      if (item.id > this.maxId) { this.newerSeen = true; this.showRange(); }
      return false;
    }
    const tr = this.render(item);
    let before = null;
    for (const row of this.tbody.children) {
      if (Number(row.dataset.id) < item.id) { before = row; break; }
    }
    this.tbody.insertBefore(tr, before);
    this.rows.set(item.id, { item, tr });
    while (this.rows.size > WINDOW) {
      const oldest = this.minId;
      this.rows.get(oldest).tr.remove();
      this.rows.delete(oldest);
    }
    if (!quiet) flash(tr);
    this.showRange();
    return true;
  }

  showRange() {
    const range = $(testid(`${this.name}-range`));
    const count = this.rows.size;
    let text = count ? `${this.minId}–${this.maxId} (${count})` : 'none';
    text += this.live ? ' · live' : (this.newerSeen ? ' · newer ones arrived' : '');
    range.textContent = text;
    $(testid(`${this.name}-older`)).disabled = !count || this.minId <= 1;
    $(testid(`${this.name}-newer`)).disabled = this.live;
  }

  // Reads from a little before the anchor up to the end, keeping the newest WINDOW rows:
  // usually one request.
  async showNewest() {
    const base = this.base();
    const anchor = (await this.anchor()) ?? await newestId(base);
    let after = Math.max(0, anchor - WINDOW);
    let kept = [];
    for (;;) {
      const { body } = await call('GET', `${base}?after=${after}&limit=1000`);
      kept = kept.concat(body).slice(-WINDOW);
      if (body.length < 1000) break;
      after = body[body.length - 1].id;
    }
    this.replace(kept, true);
  }

  async showOlder() {
    const min = this.minId;
    if (!Number.isFinite(min)) return this.showNewest();
    const after = Math.max(0, min - 1 - WINDOW);
    const { body } = await call('GET', `${this.base()}?after=${after}&limit=${WINDOW}`);
    const older = body.filter((r) => r.id < min);
    if (older.length) this.replace(older, false);
  }

  async showNewer() {
    const { body } = await call('GET', `${this.base()}?after=${this.maxId}&limit=${WINDOW}`);
    if (body.length < WINDOW) return this.showNewest();
    this.replace(body, false);
  }
}

// Whether `a` is an older copy of the same row than `b` (by its updatedAt).
function isOlderCopy(a, b) {
  const [ta, tb] = [Date.parse(a.updatedAt), Date.parse(b.updatedAt)];
  return Number.isFinite(ta) && Number.isFinite(tb) && ta < tb;
}

// Rows are rendered anew on each change, so the class alone starts the highlight.
function flash(tr) {
  tr.classList.add('flash');
}

// Runs `fn(key)` once per key at a time; calls while it runs make it run once more after.
function coalesced(fn) {
  const running = new Map();
  return (key) => {
    const known = running.get(key);
    if (known) { known.again = true; return known.done; }
    const job = { again: false };
    running.set(key, job);
    job.done = (async () => {
      try {
        do { job.again = false; await fn(key); } while (job.again);
      } finally {
        running.delete(key);
      }
    })();
    return job.done;
  };
}

// Re-reads the rows of a window that events named, in batches: ids named within BATCH_MS of
// each other are read together, a run of nearby ids with one page request
// (`?after=<first-1>&limit=<span>`) instead of one request each, so a burst of events costs
// a few requests, not thousands. One batch at a time.
const BATCH_MS = 80;

class Refresher {
  constructor(list, one) {
    Object.assign(this, { list, one });
    this.dirty = new Set();
    this.timer = null;
    this.running = false;
  }

  mark(id) {
    if (!this.list.accepts(id)) {
      if (id > this.list.maxId && !this.list.live) { this.list.newerSeen = true; this.list.showRange(); }
      return;
    }
    this.dirty.add(id);
    this.schedule();
  }

  schedule() {
    if (this.timer === null && !this.running) this.timer = setTimeout(() => this.flush(), BATCH_MS);
  }

  async flush() {
    this.timer = null;
    this.running = true;
    const ids = [...this.dirty].sort((a, b) => a - b);
    this.dirty.clear();
    const quiet = ids.length > 4;
    try {
      for (const run of runs(ids)) {
        if (run.length <= 2) {
          await Promise.all(run.map(async (id) => {
            try {
              this.list.upsert((await call('GET', this.one(id))).body, quiet);
            } catch (e) {
              if (e.status !== 404) throw e;
            }
          }));
        } else {
          const first = run[0];
          const span = run[run.length - 1] - first + 1;
          const { body } = await call('GET', `${this.list.base()}?after=${first - 1}&limit=${span}`);
          const wanted = new Set(run);
          for (const item of body) if (wanted.has(item.id)) this.list.upsert(item, quiet);
        }
      }
    } catch (e) {
      failure(`refreshing ${this.list.name}`, e);
    } finally {
      this.running = false;
      if (this.dirty.size) this.schedule();
    }
  }
}

// Sorted ids cut into runs of nearby ids, each at most 1000 wide (the largest page).
function runs(ids) {
  const out = [];
  for (const id of ids) {
    const run = out[out.length - 1];
    if (run && id - run[run.length - 1] <= 20 && id - run[0] < 1000) run.push(id);
    else out.push([id]);
  }
  return out;
}

const yes = (b) => (b ? '✓' : '–');
const stateBadge = (s, id) => el('span', { class: `state ${s || ''}`, 'data-testid': id, text: s || '–' });

// ---- orders ----

const orders = new ListWindow({
  name: 'orders',
  base: () => `${urls.orders}/orders`,
  anchor: async () => (await call('GET', `${urls.orders}/dashboard/config`)).body.newestOrderId ?? null,
  tbody: $(testid('order-rows')),
  render: (o) => {
    const name = o.productName || products.get(o.productId)?.name;
    const product = name ? `${name} (#${o.productId})` : `#${o.productId}`;
    const tr = el('tr', { 'data-testid': `order-row-${o.id}`, 'data-id': o.id, 'data-state': o.state },
      el('td', { class: 'num', text: o.id }),
      el('td', {}, stateBadge(o.state, `order-state-${o.id}`)),
      el('td', { 'data-testid': `order-product-${o.id}`, text: product }),
      el('td', { class: 'num', 'data-testid': `order-quantity-${o.id}`, text: o.quantity }),
      el('td', { 'data-testid': `order-stock-reserved-${o.id}`, text: yes(o.stockReserved) }),
      el('td', {}, stateBadge(o.deliveryState, `order-delivery-${o.id}`)),
      el('td', { 'data-testid': `order-cancel-requested-${o.id}`, text: yes(o.cancelRequested) }),
      el('td', { class: 'message', 'data-testid': `order-message-${o.id}`, text: o.stateMessage || '' },
        ...parkedBadge(o)),
      el('td', {},
        el('button', { type: 'button', class: 'danger', 'data-action': 'cancel', 'data-testid': `cancel-order-${o.id}`,
          title: 'PATCH /orders/{id} {"state":"OrderCancelled"} as the customer', text: 'cancel' })));
    if (o.id === timeline.orderId) tr.classList.add('selected');
    return tr;
  },
});

// An order whose saga waits on a parked event says so: which service parked what, and why
// (the dead letters panel below can redrive or discard it).
function parkedBadge(o) {
  const parked = o.parkedEvents || [];
  if (!parked.length) return [];
  const title = parked.map((p) => `${p.service} parked ${p.parkedEventType} (dead letter ${p.deadLetterId}): ${p.stateMessage}`).join('\n');
  return [el('span', { class: 'parked', 'data-testid': `order-parked-${o.id}`, title, text: `⚠ ${parked.length} parked` })];
}

const orderRefresher = new Refresher(orders, (id) => `${urls.orders}/orders/${id}`);

async function cancelOrder(id) {
  try {
    const { status, body } = await call('PATCH', `${urls.orders}/orders/${id}`, { state: 'OrderCancelled' });
    const attrs = { 'data-status': status, 'data-order-id': id };
    if (status === 202) say('info', `order ${id}: cancel requested (202) — ${body.stateMessage || ''}`, attrs);
    else say('ok', `order ${id}: cancelled (${status})${body.stateMessage ? ` — ${body.stateMessage}` : ''}`, attrs);
    orders.upsert(body);
  } catch (e) {
    failure(`cancel order ${id}`, e, { 'data-order-id': id });
  }
}

$(testid('order-rows')).addEventListener('click', (event) => {
  const tr = event.target.closest('tr[data-id]');
  if (!tr) return;
  const id = Number(tr.dataset.id);
  if (event.target.closest('[data-action="cancel"]')) cancelOrder(id);
  else timeline.show(id);
});

// ---- catalog ----

const products = new Map(); // id → product

function renderProduct(p) {
  return el('tr', { 'data-testid': `product-row-${p.id}`, 'data-id': p.id },
    el('td', { class: 'num', text: p.id }),
    el('td', { 'data-testid': `product-name-${p.id}`, text: p.name }),
    el('td', { class: 'num', text: p.price }),
    el('td', { class: 'num', 'data-testid': `product-stock-${p.id}`, text: p.stock }),
    el('td', { class: 'num', 'data-testid': `product-reserved-${p.id}`, text: p.reserved ?? '' }),
    el('td', { class: 'num', 'data-testid': `product-delivered-${p.id}`, text: p.delivered ?? '' }));
}

function productOption(p) {
  return el('option', { value: p.id, 'data-id': p.id, text: `${p.name} (#${p.id}) · stock ${p.stock}` });
}

function upsertProduct(p) {
  const tbody = $(testid('product-rows'));
  const select = $(testid('place-product'));
  const row = renderProduct(p);
  const option = productOption(p);
  const chosen = select.value;
  if (products.has(p.id)) {
    tbody.querySelector(`tr[data-id="${p.id}"]`)?.replaceWith(row);
    select.querySelector(`option[data-id="${p.id}"]`)?.replaceWith(option);
    if (chosen) select.value = chosen;
  } else {
    const before = [...tbody.children].find((r) => Number(r.dataset.id) > p.id) || null;
    tbody.insertBefore(row, before);
    const beforeOption = [...select.options].find((o) => Number(o.value) > p.id) || null;
    select.insertBefore(option, beforeOption);
  }
  products.set(p.id, p);
  flash(row);
}

async function loadCatalog() {
  try {
    const { body } = await call('GET', `${urls.products}/products`);
    const select = $(testid('place-product'));
    const chosen = select.value;
    products.clear();
    $(testid('product-rows')).replaceChildren();
    select.replaceChildren();
    for (const p of body.slice(0, 1000)) upsertProduct(p);
    if (chosen) select.value = chosen;
  } catch (e) {
    failure('GET products /products', e);
  }
}

const refreshProduct = coalesced(async (id) => {
  try {
    const { body } = await call('GET', `${urls.products}/products/${id}`);
    upsertProduct(body);
  } catch (e) {
    failure(`GET products /products/${id}`, e);
  }
});

$(testid('catalog-refresh')).addEventListener('click', loadCatalog);

// ---- place an order ----

$(testid('token-form')).addEventListener('submit', (event) => {
  event.preventDefault();
  sessionStorage.setItem('mall-token', $(testid('token')).value.trim());
  location.reload();
});

$(testid('place-form')).addEventListener('submit', async (event) => {
  event.preventDefault();
  const productId = Number($(testid('place-product')).value);
  const quantity = Number($(testid('place-quantity')).value);
  const customerId = $(testid('place-customer')).value.trim();
  const button = $(testid('place-submit'));
  button.disabled = true;
  try {
    const { status, body } = await call('POST', `${urls.orders}/orders`, { productId, quantity, customerId });
    say('ok', `order ${body.id} placed (${status}): ${body.state}, ${quantity} × ${body.productName || `#${productId}`}`,
      { 'data-status': status, 'data-order-id': body.id, 'data-customer': customerId });
    if (!orders.live) await orders.showNewest();
    orders.upsert(body);
  } catch (e) {
    failure('place order', e);
  } finally {
    button.disabled = false;
  }
});

// ---- deliveries ----

const deliveries = new ListWindow({
  name: 'deliveries',
  base: () => `${urls.delivery}/deliveries`,
  // The newest orders' deliveries are about the newest deliveries.
  anchor: async () => {
    const ids = [...orders.rows.values()].map((r) => r.item.deliveryId).filter(Boolean);
    return ids.length ? Math.max(...ids) : null;
  },
  tbody: $(testid('delivery-rows')),
  render: (d) => el('tr', { 'data-testid': `delivery-row-${d.id}`, 'data-id': d.id, 'data-order-id': d.orderId },
    el('td', { class: 'num', text: d.id }),
    el('td', { class: 'num', text: d.orderId }),
    el('td', {}, stateBadge(d.deliveryState, `delivery-state-${d.id}`)),
    el('td', { 'data-testid': `delivery-confirmed-${d.id}`, text: yes(d.orderConfirmed) }),
    el('td', { class: 'message', text: d.stateMessage || '' }),
    el('td', {},
      el('button', { type: 'button', 'data-action': 'DeliveryCompleted', 'data-testid': `delivery-complete-${d.id}`,
        title: 'PATCH /deliveries/{id} as the courier', text: 'complete' }), ' ',
      el('button', { type: 'button', class: 'danger', 'data-action': 'DeliveryCancelled',
        'data-testid': `delivery-cancel-${d.id}`, title: 'PATCH /deliveries/{id} as the courier', text: 'cancel' }))),
});

const deliveryRefresher = new Refresher(deliveries, (id) => `${urls.delivery}/deliveries/${id}`);

// An event without its delivery's id (none so far): find the delivery by its order.
const refreshDeliveryOf = coalesced(async (orderId) => {
  try {
    const { body } = await call('GET', `${urls.delivery}/deliveries?orderId=${orderId}`);
    for (const d of body) deliveries.upsert(d);
  } catch (e) {
    failure(`GET delivery /deliveries?orderId=${orderId}`, e);
  }
});

async function courier(id, deliveryState) {
  const verb = deliveryState === 'DeliveryCompleted' ? 'complete' : 'cancel';
  try {
    const { status, body } = await call('PATCH', `${urls.delivery}/deliveries/${id}`, { deliveryState });
    say('ok', `delivery ${id}: ${body.deliveryState} (${status})`, { 'data-status': status, 'data-delivery-id': id });
    deliveries.upsert(body);
  } catch (e) {
    failure(`courier ${verb} delivery ${id}`, e, { 'data-delivery-id': id });
  }
}

$(testid('delivery-rows')).addEventListener('click', (event) => {
  const button = event.target.closest('button[data-action]');
  const tr = event.target.closest('tr[data-id]');
  if (button && tr) courier(Number(tr.dataset.id), button.dataset.action);
});

// ---- dead letters of all three services ----

async function loadDeadLetters() {
  const tbody = $(testid('dead-letter-rows'));
  const rows = [];
  await Promise.all(['orders', 'products', 'delivery'].map(async (service) => {
    const base = `${urls[service]}/dead-letters`;
    try {
      const newest = await newestId(base);
      const after = Math.max(0, newest - DEAD_LETTERS);
      const { body } = await call('GET', `${base}?after=${after}&limit=${DEAD_LETTERS}`);
      for (const d of body) rows.push({ service, ...d });
    } catch (e) {
      rows.push({ service, error: e.message });
    }
  }));
  rows.sort((a, b) => String(b.parkedAt || '').localeCompare(String(a.parkedAt || '')));
  tbody.replaceChildren(...rows.map((d) => (d.error
    ? el('tr', { 'data-testid': `dead-letters-error-${d.service}` },
      el('td', { text: d.service }), el('td', { colspan: 6, class: 'message', text: `cannot list: ${d.error}` }))
    : el('tr', { 'data-testid': `dead-letter-row-${d.service}-${d.id}`, 'data-service': d.service },
      el('td', { text: d.service }),
      el('td', { class: 'num', text: d.id }),
      el('td', { text: d.kind }),
      el('td', { class: 'message', 'data-testid': `dead-letter-reason-${d.service}-${d.id}`, text: d.reason }),
      el('td', { text: `${d.topic}[${d.partition}]@${d.offset}${d.messageKey ? ` key ${d.messageKey}` : ''}` }),
      el('td', { class: 'num', title: `sha256 ${d.payloadSha256}`, text: `${d.payloadBytes} B` }),
      el('td', { text: d.parkedAt }),
      el('td', { 'data-testid': `dead-letter-status-${d.service}-${d.id}`, title: d.resolution || '', text: d.status || '' }),
      el('td', {}, ...(d.status === 'parked' ? [
        ...(d.eventType ? [el('button', { type: 'button', 'data-testid': `redrive-${d.service}-${d.id}`,
          title: `POST /dead-letters/${d.id}/redrive: send the ${d.eventType} back to ${d.service} with a new event id`,
          'data-action': 'redrive', 'data-service': d.service, 'data-id': d.id, text: 'redrive' })] : []),
        el('button', { type: 'button', class: 'danger', 'data-testid': `discard-${d.service}-${d.id}`,
          title: `POST /dead-letters/${d.id}/discard {"reason": ...}`,
          'data-action': 'discard', 'data-service': d.service, 'data-id': d.id, text: 'discard' }),
      ] : []))))));
  if (!rows.length) tbody.append(el('tr', {}, el('td', { colspan: 9, class: 'message', text: 'nothing parked' })));
}

// Redrive or discard one parked message (a discard asks why: the record keeps the reason).
async function resolveDeadLetter(service, id, action) {
  let body;
  if (action === 'discard') {
    const reason = window.prompt(`Why discard ${service} dead letter ${id}?`);
    if (!reason) return;
    body = { reason };
  }
  try {
    const { body: answer } = await call('POST', `${urls[service]}/dead-letters/${id}/${action}`, body);
    say('ok', `${service} dead letter ${id}: ${answer.resolution}`);
  } catch (e) {
    failure(`${action} of ${service} dead letter ${id}`, e);
  }
  loadDeadLetters();
}

$(testid('dead-letters-refresh')).addEventListener('click', loadDeadLetters);
$(testid('dead-letter-rows')).addEventListener('click', (event) => {
  const button = event.target.closest('button[data-action]');
  if (button) resolveDeadLetter(button.dataset.service, Number(button.dataset.id), button.dataset.action);
});

// ---- the timeline of one order, as inline SVG ----

const LANES = ['orders', 'products', 'delivery'];
const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === 'text') node.textContent = v; else node.setAttribute(k, String(v));
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function clock(timestamp) {
  const t = new Date(timestamp);
  return Number.isNaN(t.getTime()) ? timestamp : t.toISOString().slice(11, 23);
}

// Lanes top to bottom, events left to right in time order; an arrow from each cause to its
// effect labelled with the hop's time; compensation events (non-null initiator) and the arrows
// into them in the compensation colour, the initiator under the mark. Fits the panel's width
// (scaled down a little when needed; scrolls when the saga is very long).
function drawTimeline(events, available) {
  const left = 86;
  const top = 30;
  const lane = 108;
  const sorted = events
    .map((e, index) => ({ ...e, index, at: Date.parse(e.timestamp) }))
    .sort((a, b) => (a.at - b.at) || (a.index - b.index));
  const n = Math.max(sorted.length, 1);
  const step = Math.min(150, Math.max(108, (available - left - 16) / n));
  const width = Math.round(left + n * step + 16);
  const height = top + LANES.length * lane + 6;
  const fit = width > available && width < available * 1.6;
  const root = svg('svg', {
    width: fit ? '100%' : width, height: fit ? undefined : height, viewBox: `0 0 ${width} ${height}`,
    role: 'img', 'aria-label': 'saga timeline', 'data-testid': 'timeline-svg',
  });
  const defs = svg('defs');
  for (const kind of ['forward', 'compensation']) {
    defs.append(svg('marker', { id: `arrow-${kind}`, viewBox: '0 0 10 10', refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    svg('path', { d: 'M0,0 L10,5 L0,10 z', class: `arrowhead ${kind}` })));
  }
  root.append(defs);
  LANES.forEach((name, i) => {
    const y = top + i * lane;
    root.append(svg('g', { class: 'lane', 'data-lane': name },
      svg('rect', { x: 0, y: y + 3, width, height: lane - 6, rx: 4 }),
      svg('text', { x: 10, y: y + lane / 2 + 4, text: name })));
  });
  const position = new Map();
  const lastInLane = new Map();
  sorted.forEach((e, i) => {
    const laneIndex = Math.max(0, LANES.indexOf(e.source));
    const x = left + i * step + step / 2;
    // A neighbour in the same lane too close for two labels side by side: stagger them.
    const before = lastInLane.get(laneIndex);
    const level = before && x - before.x < 140 && before.level === 0 ? 1 : 0;
    lastInLane.set(laneIndex, { x, level });
    position.set(e.eventId, { x, y: top + laneIndex * lane + lane / 2 + 6, level, e });
  });
  // Arrows first, so the marks sit on top. Each is a gentle arc, so an arrow never runs
  // straight through a mark that happens to lie between its ends.
  const hops = svg('g', { class: 'hops' });
  for (const { x, y, e } of position.values()) {
    const cause = e.causationId && position.get(e.causationId);
    if (!cause) continue;
    const kind = e.initiator ? 'compensation' : 'forward';
    const ms = e.at - cause.e.at;
    const [dx, dy] = [x - cause.x, y - cause.y];
    const len = Math.hypot(dx, dy) || 1;
    const bend = Math.min(60, Math.max(22, len * 0.2));
    // Control point: off the chord's middle, to its left (upwards for a rightward arrow).
    const [cx, cy] = [(cause.x + x) / 2 + (dy / len) * bend, (cause.y + y) / 2 - (dx / len) * bend];
    const r = 11;
    const towards = (px, py, qx, qy) => {
      const l = Math.hypot(qx - px, qy - py) || 1;
      return [px + ((qx - px) / l) * r, py + ((qy - py) / l) * r];
    };
    const [x1, y1] = towards(cause.x, cause.y, cx, cy);
    const [x2, y2] = towards(x, y, cx, cy);
    // The label sits past the middle, towards the effect: arrows leaving one cause diverge there.
    const t = 0.62;
    const at = (p0, c, p2) => (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p2;
    const [lx, ly] = [at(x1, cx, x2), at(y1, cy, y2)];
    hops.append(svg('g', { class: `hop ${kind}`, 'data-testid': 'timeline-hop', 'data-from': cause.e.eventType,
      'data-to': e.eventType, 'data-ms': Number.isFinite(ms) ? ms : '' },
    svg('path', { d: `M${x1},${y1} Q${cx},${cy} ${x2},${y2}`, 'marker-end': `url(#arrow-${kind})` }),
    svg('text', { x: lx, y: ly + 4, 'text-anchor': 'middle', text: Number.isFinite(ms) ? `${ms} ms` : '?' })));
  }
  root.append(hops);
  for (const { x, y, level, e } of position.values()) {
    const compensation = Boolean(e.initiator);
    const trigger = triggerOf(e);
    const g = svg('g', { class: `mark ${compensation ? 'compensation' : 'forward'}${trigger ? ` ${trigger.kind}` : ''}`,
      'data-testid': 'timeline-event', 'data-event-type': e.eventType, 'data-source': e.source,
      'data-initiator': e.initiator || '', 'data-compensation': compensation,
      'data-trigger': trigger ? trigger.kind : '' },
    svg('title', { text: `${e.eventType} from ${e.source} at ${e.timestamp}\neventId ${e.eventId}\n`
      + `causationId ${e.causationId || `(none: ${trigger.what})`}\ninitiator ${e.initiator || '–'}\n`
      + JSON.stringify(e.payload) }),
    svg('circle', { cx: x, cy: y, r: 9 }),
    svg('text', { class: 'type', x, y: y - 15 - level * 13, 'text-anchor': 'middle', text: e.eventType }),
    svg('text', { class: 'time', x, y: y + 23, 'text-anchor': 'middle', text: clock(e.timestamp) }));
    // Below the time: the chain's initiator for a compensation, then what started a cause-less
    // event (an HTTP request, or orders' saga timeout).
    const below = [];
    if (compensation) below.push(['initiator', `initiator: ${e.initiator}`]);
    if (trigger && !(compensation && trigger.kind === 'http')) below.push([`via ${trigger.kind}`, trigger.label]);
    below.forEach(([cls, text], line) => {
      g.append(svg('text', { class: cls, x, y: y + 35 + line * 12, 'text-anchor': 'middle', text }));
    });
    root.append(g);
  }
  return root;
}

// What started an event that has no cause on the topic: orders' saga timeout says so in its
// OrderCancelled (`reason`); every other one came from an HTTP request. Null for caused events.
function triggerOf(e) {
  if (e.causationId) return null;
  if (e.payload?.reason === 'sagaTimeout' || e.eventType === 'CancelRequestExpired') {
    return { kind: 'timer', label: 'saga timeout', what: "orders' saga timeout" };
  }
  if (e.eventType === 'DeadLetterRedriven' || e.eventType === 'DeadLetterDiscarded') {
    return { kind: 'http', label: 'administrator', what: 'an administrator (POST /dead-letters/{id}/…)' };
  }
  return { kind: 'http', label: 'HTTP request', what: 'an HTTP request' };
}

const timeline = {
  orderId: null,
  async show(id) {
    this.orderId = id;
    for (const tr of document.querySelectorAll('tr.selected')) tr.classList.remove('selected');
    orders.rows.get(id)?.tr.classList.add('selected');
    $(testid('timeline-order')).textContent = `· order ${id}`;
    await refreshTimeline(id);
  },
};

const refreshTimeline = coalesced(async (id) => {
  const box = $(testid('timeline'));
  try {
    const { body } = await call('GET', `${urls.orders}/orders/${id}/events`);
    if (timeline.orderId !== id) return;
    const initiators = [...new Set(body.filter((e) => e.initiator).map((e) => e.initiator))];
    const total = body.length > 1 ? Date.parse(body[body.length - 1].timestamp) - Date.parse(body[0].timestamp) : 0;
    const summary = el('p', { class: 'summary', 'data-testid': 'timeline-summary' },
      `${body.length} events over ${Number.isFinite(total) ? total : '?'} ms`);
    if (initiators.length) {
      summary.append('; compensation started by ', el('b', { 'data-testid': 'timeline-initiator', text: initiators.join(', ') }));
    }
    const timedOut = body.find((e) => triggerOf(e)?.kind === 'timer');
    if (timedOut) {
      summary.append(' — ', el('b', { 'data-testid': 'timeline-timeout', text: 'saga timeout' }),
        `: ${timedOut.payload?.stateMessage ?? 'cancelled by orders'}`);
    }
    box.dataset.orderId = id;
    box.replaceChildren(summary, drawTimeline(body, box.clientWidth || 800));
  } catch (e) {
    if (timeline.orderId !== id) return;
    box.replaceChildren(el('p', { class: 'hint' }, `cannot show order ${id}: ${e.message}`));
    failure(`GET /orders/${id}/events`, e);
  }
});

// ---- the event stream ----

// Products and delivery announce what they do (the event's source), except two silent
// effects: products settles a reservation when it reads DeliveryCompleted, and delivery marks
// its delivery confirmed when it reads OrderCompleted. For those the page looks once more a
// moment later.
const SILENT_EFFECT_MS = 1000;

function onEvent(e) {
  if (!ready) { early.push(e); return; }
  orderRefresher.mark(e.orderId);
  const order = orders.rows.get(e.orderId)?.item;
  const productId = e.payload?.productId ?? order?.productId;
  const deliveryId = e.payload?.deliveryId ?? order?.deliveryId;
  if (productId && e.source === 'products') refreshProduct(productId);
  if (productId && e.eventType === 'DeliveryCompleted') {
    refreshProduct(productId);
    setTimeout(() => refreshProduct(productId), SILENT_EFFECT_MS);
  }
  if (e.source === 'delivery') {
    if (deliveryId) deliveryRefresher.mark(deliveryId); else refreshDeliveryOf(e.orderId);
  }
  if (deliveryId && e.eventType === 'OrderCompleted') {
    setTimeout(() => deliveryRefresher.mark(deliveryId), SILENT_EFFECT_MS);
  }
  if (timeline.orderId === e.orderId) refreshTimeline(e.orderId);
}

function streamStatus(state, text) {
  const s = $(testid('stream-status'));
  s.dataset.state = state;
  s.textContent = text;
}

let lastSeq = null; // where a stream opened anew resumes

function connect() {
  // EventSource cannot send headers: the stream alone takes the token as a parameter.
  const query = new URLSearchParams();
  if (lastSeq !== null) query.set('after', lastSeq);
  if (token) query.set('access_token', token);
  const source = new EventSource(`${urls.orders}/events/stream?${query}`);
  source.addEventListener('hello', (m) => {
    lastSeq = Number(m.lastEventId);
    streamStatus('live', `live · events after seq ${m.lastEventId}`);
    if (!ready) loadEverything();
  });
  // Asked for more than the server replays: it resumes at the window's start.
  source.addEventListener('skipped', (m) => {
    lastSeq = Number(m.lastEventId);
  });
  source.onmessage = (m) => {
    let e;
    try { e = JSON.parse(m.data); } catch { return; }
    lastSeq = e.seq;
    $(testid('stream-status')).textContent = `live · last event seq ${e.seq}`;
    onEvent(e);
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // The server refused (not a dropped connection, which the browser retries itself).
      source.close();
      streamStatus('reconnecting', 'stream closed; reconnecting in 3 s');
      // Refused (no token, or a role the stream is not for): show what this token may read.
      if (!ready) loadEverything();
      setTimeout(connect, 3000);
    } else {
      streamStatus('reconnecting', 'reconnecting…');
    }
  };
}

async function loadEverything() {
  const steps = [
    loadCatalog(),
    orders.showNewest().catch((e) => failure('GET /orders', e))
      .then(() => deliveries.showNewest().catch((e) => failure('GET delivery /deliveries', e))),
    loadDeadLetters(),
  ];
  await Promise.all(steps);
  ready = true;
  document.body.dataset.loadedMs = Math.round(performance.now());
  for (const e of early.splice(0)) onEvent(e);
}

for (const list of [orders, deliveries]) {
  const run = (what) => () => list[what]().catch((e) => failure(`${list.name}: ${what}`, e));
  $(testid(`${list.name}-older`)).addEventListener('click', run('showOlder'));
  $(testid(`${list.name}-newer`)).addEventListener('click', run('showNewer'));
  $(testid(`${list.name}-newest`)).addEventListener('click', run('showNewest'));
}

// ---- each service's /health: a part down or stuck shows in red, its error in the tooltip ----

const HEALTH_EVERY_MS = 5000;
const HEALTH_TIMEOUT_MS = 3000; // a frozen process accepts the connection and never answers

async function checkHealth() {
  await Promise.all(['orders', 'products', 'delivery'].map(async (service) => {
    const badge = $(testid(`health-${service}`));
    let state;
    let detail;
    try {
      await call('GET', `${urls[service]}/health`, undefined, HEALTH_TIMEOUT_MS);
      [state, detail] = ['ok', 'healthy'];
    } catch (e) {
      // 503 names every part that is down or stuck; 0: no answer at all.
      [state, detail] = e.status ? ['down', e.message] : ['unreachable', e.message];
    }
    badge.dataset.state = state;
    badge.title = `${service} /health: ${detail}`;
    badge.textContent = state === 'ok' ? service : `${service}: ${state === 'down' ? 'unhealthy' : 'no answer'}`;
  }));
}

async function start() {
  let config = {};
  try {
    ({ body: config } = await call('GET', `${urls.orders}/dashboard/config`));
  } catch (e) {
    failure('GET /dashboard/config', e);
  }
  const host = location.hostname.includes(':') ? `[${location.hostname}]` : location.hostname;
  urls.products = params.get('products') || config.productsUrl || `${location.protocol}//${host}:8085`;
  urls.delivery = params.get('delivery') || config.deliveryUrl || `${location.protocol}//${host}:8082`;
  for (const key of ['products', 'delivery']) urls[key] = urls[key].replace(/\/+$/, '');
  document.body.dataset.products = urls.products;
  document.body.dataset.delivery = urls.delivery;
  connect();
  checkHealth();
  setInterval(checkHealth, HEALTH_EVERY_MS);
}

start();
