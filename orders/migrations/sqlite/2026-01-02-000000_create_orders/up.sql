CREATE TABLE orders (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id     BIGINT  NOT NULL,
    product_name   TEXT,
    quantity       BIGINT  NOT NULL CHECK (quantity > 0),
    price          BIGINT,
    customer_id    TEXT    NOT NULL,
    customer_name  TEXT,
    customer_addr  TEXT,
    state          TEXT    NOT NULL CHECK (state IN ('OrderPlaced', 'OrderCompleted', 'OrderCancelled')),
    stock_reserved BOOLEAN NOT NULL DEFAULT 0,
    delivery_id    BIGINT,
    delivery_state TEXT,
    state_message  TEXT,
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL
);
CREATE INDEX orders_by_customer ON orders (customer_id, id);

-- Every saga event of an order, from all three services, in topic order.
CREATE TABLE order_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id     BIGINT NOT NULL,
    event_id     TEXT   NOT NULL UNIQUE,
    event_type   TEXT   NOT NULL,
    source       TEXT   NOT NULL,
    causation_id TEXT,
    initiator    TEXT,
    timestamp    TEXT   NOT NULL,
    payload      TEXT   NOT NULL
);
CREATE INDEX order_events_by_order ON order_events (order_id, seq);

-- Orders' replica of the catalog, kept current from ProductChanged.
CREATE TABLE products (
    id         BIGINT PRIMARY KEY NOT NULL,
    name       TEXT   NOT NULL,
    price      BIGINT NOT NULL,
    stock      BIGINT NOT NULL,
    updated_at TEXT   NOT NULL
);
