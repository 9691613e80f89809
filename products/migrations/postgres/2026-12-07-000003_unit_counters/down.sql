CREATE INDEX stock_reservations_by_product ON stock_reservations (product_id, state);
ALTER TABLE products ADD COLUMN delivered_archived BIGINT NOT NULL DEFAULT 0;
UPDATE products SET delivered_archived = delivered
    - (SELECT COALESCE(SUM(quantity), 0) FROM stock_reservations r
       WHERE r.product_id = products.id AND r.state = 'Delivered');
ALTER TABLE products DROP COLUMN delivered;
ALTER TABLE products DROP COLUMN reserved;
