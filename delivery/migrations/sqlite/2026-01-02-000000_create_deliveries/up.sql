CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id         BIGINT  NOT NULL UNIQUE,
    product_id       BIGINT  NOT NULL,
    quantity         BIGINT  NOT NULL,
    customer_id      TEXT    NOT NULL,
    customer_name    TEXT,
    delivery_address TEXT,
    delivery_state   TEXT    NOT NULL
        CHECK (delivery_state IN ('DeliveryStarted', 'DeliveryCompleted', 'DeliveryCancelled')),
    order_confirmed  BOOLEAN NOT NULL DEFAULT 0,
    state_message    TEXT,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL
);
