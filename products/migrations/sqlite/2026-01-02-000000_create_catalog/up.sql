CREATE TABLE products (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    name  TEXT    NOT NULL,
    price BIGINT  NOT NULL CHECK (price >= 0),
    stock BIGINT  NOT NULL CHECK (stock >= 0)
);

-- What products decided for each order, so a release happens once and only for a reservation.
CREATE TABLE stock_reservations (
    order_id   BIGINT PRIMARY KEY NOT NULL,
    product_id BIGINT NOT NULL,
    quantity   BIGINT NOT NULL,
    state      TEXT   NOT NULL CHECK (state IN ('Reserved', 'Released', 'Rejected')),
    updated_at TEXT   NOT NULL
);
