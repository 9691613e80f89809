-- Reservations gain Delivered (settled when the delivery completes) and Voided (cancelled
-- before OrderPlaced arrived). SQLite cannot change a CHECK, so the table is rebuilt.
CREATE TABLE stock_reservations_new (
    order_id   BIGINT PRIMARY KEY NOT NULL,
    product_id BIGINT NOT NULL,
    quantity   BIGINT NOT NULL,
    state      TEXT   NOT NULL
        CHECK (state IN ('Reserved', 'Released', 'Rejected', 'Delivered', 'Voided')),
    updated_at TEXT   NOT NULL
);
INSERT INTO stock_reservations_new SELECT * FROM stock_reservations;
DROP TABLE stock_reservations;
ALTER TABLE stock_reservations_new RENAME TO stock_reservations;
-- The reserved/delivered sums run inside PATCH /products' write lock.
CREATE INDEX stock_reservations_by_product ON stock_reservations (product_id, state);
