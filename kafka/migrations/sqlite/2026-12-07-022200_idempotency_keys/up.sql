-- A request's Idempotency-Key and the answer it got, stored in the transaction that acted on
-- it: a retry with the same key and body gets that answer again and changes nothing.
CREATE TABLE idempotency_keys (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    scope           TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    status          INTEGER NOT NULL,
    location        TEXT,
    response        TEXT    NOT NULL,
    created_at      TEXT    NOT NULL,
    UNIQUE (scope, idempotency_key)
);
CREATE INDEX idempotency_keys_by_created_at ON idempotency_keys (created_at);
