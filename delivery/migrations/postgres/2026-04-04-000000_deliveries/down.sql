DROP TABLE voided_orders;
DROP TABLE deliveries;
