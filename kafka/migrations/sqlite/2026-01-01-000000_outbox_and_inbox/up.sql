-- Plumbing shared by every service database.

-- Events waiting to be published, written in the same transaction as the state change.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL UNIQUE,
    event_type   TEXT    NOT NULL,
    message_key  TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    created_at   TEXT    NOT NULL,
    published_at TEXT
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Event ids this service has already applied: a redelivery finds its id here and does nothing.
CREATE TABLE processed_events (
    event_id     TEXT PRIMARY KEY NOT NULL,
    event_type   TEXT NOT NULL,
    processed_at TEXT NOT NULL
);
