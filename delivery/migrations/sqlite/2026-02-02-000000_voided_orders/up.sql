-- Orders cancelled before their OrderPlaced arrived here: a late OrderPlaced starts nothing.
CREATE TABLE voided_orders (
    order_id  BIGINT PRIMARY KEY NOT NULL,
    voided_at TEXT   NOT NULL
);
