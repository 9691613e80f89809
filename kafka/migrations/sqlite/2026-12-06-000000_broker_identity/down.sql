DROP TABLE broker_identity;
