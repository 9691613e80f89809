DROP TABLE members;
DROP TABLE leases;
