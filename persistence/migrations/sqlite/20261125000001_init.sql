-- hexfleet schema, SQLite. Mirrors migrations/postgres; tenant first in every key.
-- Integers are INTEGER (i64), booleans INTEGER 0/1, JSON is TEXT, times are Unix ms.

CREATE TABLE couriers (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    name         TEXT,
    vehicle      TEXT             NOT NULL,
    capacity     INTEGER          NOT NULL,
    device_id    TEXT,
    status       TEXT             NOT NULL,
    on_shift     INTEGER          NOT NULL,
    fix_lat      REAL,
    fix_lng      REAL,
    fix_ts       INTEGER,
    fix_speed    REAL,
    fix_heading  REAL,
    fix_acc      REAL,
    updated_at   INTEGER          NOT NULL,
    PRIMARY KEY (tenant, id)
);
-- Not unique on purpose: a duplicate device id must not make snapshot flushes fail forever;
-- uniqueness is checked by the actors.
CREATE INDEX couriers_device ON couriers (tenant, device_id) WHERE device_id IS NOT NULL;

CREATE TABLE orders (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    pickup_lat   REAL             NOT NULL,
    pickup_lng   REAL             NOT NULL,
    dropoff_lat  REAL             NOT NULL,
    dropoff_lng  REAL             NOT NULL,
    size         INTEGER          NOT NULL,
    ready_at     INTEGER,
    deliver_by   INTEGER,
    state        TEXT             NOT NULL,
    courier      TEXT,
    offer_courier    TEXT,
    offer_expires_at INTEGER,
    declined     TEXT             NOT NULL, -- JSON array of courier ids
    assignment   TEXT,                      -- JSON object, see rows.rs
    created_at   INTEGER          NOT NULL,
    updated_at   INTEGER          NOT NULL,
    version      INTEGER          NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX orders_open ON orders (tenant, id)
    WHERE state NOT IN ('delivered', 'cancelled', 'failed', 'expired');

CREATE TABLE zones (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    kind         TEXT             NOT NULL,
    name         TEXT,
    geometry     BLOB             NOT NULL, -- WKB MultiPolygon (little-endian), see src/wkb.rs
    updated_at   INTEGER          NOT NULL,
    PRIMARY KEY (tenant, id)
);

-- Append-only audit trail. Only the store's single writer task inserts, so `seq` grows in
-- commit order and `since_seq` readers never miss a row that becomes visible later.
CREATE TABLE events (
    seq          INTEGER          PRIMARY KEY AUTOINCREMENT,
    tenant       TEXT             NOT NULL,
    entity       TEXT             NOT NULL,
    entity_id    TEXT             NOT NULL,
    kind         TEXT             NOT NULL,
    actor        TEXT             NOT NULL,
    reason       TEXT,
    ts           INTEGER          NOT NULL,
    attrs        TEXT             NOT NULL
);
-- SQLite's AUTOINCREMENT needs `seq` alone as the primary key; (tenant, seq) is indexed.
CREATE UNIQUE INDEX events_tenant_seq ON events (tenant, seq);
CREATE INDEX events_entity ON events (tenant, entity, entity_id, seq);

CREATE TABLE location_history (
    tenant       TEXT             NOT NULL,
    courier      TEXT             NOT NULL,
    ts           INTEGER          NOT NULL,
    lat          REAL             NOT NULL,
    lng          REAL             NOT NULL,
    speed        REAL,
    PRIMARY KEY (tenant, courier, ts)
);
CREATE INDEX location_history_ts ON location_history (ts);

-- Market ownership for several nodes (a market is a tenant in this version).
CREATE TABLE leases (
    tenant       TEXT             NOT NULL,
    market       TEXT             NOT NULL,
    node         TEXT             NOT NULL,
    expires_at   INTEGER          NOT NULL,
    PRIMARY KEY (tenant, market)
);
