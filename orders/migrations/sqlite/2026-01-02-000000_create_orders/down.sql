DROP TABLE products;
DROP TABLE order_events;
DROP TABLE orders;
