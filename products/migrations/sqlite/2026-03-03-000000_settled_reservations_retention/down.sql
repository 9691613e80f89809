ALTER TABLE products DROP COLUMN delivered_archived;
DROP INDEX stock_reservations_settled;
