DROP TABLE stock_reservations;
DROP TABLE products;
