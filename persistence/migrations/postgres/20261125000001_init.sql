-- hexfleet schema, PostgreSQL. Mirrors migrations/sqlite; tenant first in every key.
-- Integers are BIGINT everywhere (the store decodes i64), times are Unix ms.

CREATE TABLE couriers (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    name         TEXT,
    vehicle      TEXT             NOT NULL,
    capacity     BIGINT           NOT NULL,
    device_id    TEXT,
    status       TEXT             NOT NULL,
    on_shift     BOOLEAN          NOT NULL,
    fix_lat      DOUBLE PRECISION,
    fix_lng      DOUBLE PRECISION,
    fix_ts       BIGINT,
    fix_speed    DOUBLE PRECISION,
    fix_heading  DOUBLE PRECISION,
    fix_acc      DOUBLE PRECISION,
    updated_at   BIGINT           NOT NULL,
    PRIMARY KEY (tenant, id)
);
-- Not unique on purpose: a duplicate device id must not make snapshot flushes fail forever;
-- uniqueness is checked by the actors.
CREATE INDEX couriers_device ON couriers (tenant, device_id) WHERE device_id IS NOT NULL;

CREATE TABLE orders (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    pickup_lat   DOUBLE PRECISION NOT NULL,
    pickup_lng   DOUBLE PRECISION NOT NULL,
    dropoff_lat  DOUBLE PRECISION NOT NULL,
    dropoff_lng  DOUBLE PRECISION NOT NULL,
    size         BIGINT           NOT NULL,
    ready_at     BIGINT,
    deliver_by   BIGINT,
    state        TEXT             NOT NULL,
    courier      TEXT,
    offer_courier    TEXT,
    offer_expires_at BIGINT,
    declined     TEXT             NOT NULL, -- JSON array of courier ids
    assignment   TEXT,                      -- JSON object, see rows.rs
    created_at   BIGINT           NOT NULL,
    updated_at   BIGINT           NOT NULL,
    version      BIGINT           NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX orders_open ON orders (tenant, id)
    WHERE state NOT IN ('delivered', 'cancelled', 'failed', 'expired');

CREATE TABLE zones (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    kind         TEXT             NOT NULL,
    name         TEXT,
    geometry     BYTEA            NOT NULL, -- WKB MultiPolygon (little-endian), see src/wkb.rs
    updated_at   BIGINT           NOT NULL,
    PRIMARY KEY (tenant, id)
);

-- Append-only audit trail. Only the store's single writer task inserts, so `seq` grows in
-- commit order and `since_seq` readers never miss a row that becomes visible later.
CREATE TABLE events (
    seq          BIGSERIAL        NOT NULL,
    tenant       TEXT             NOT NULL,
    entity       TEXT             NOT NULL,
    entity_id    TEXT             NOT NULL,
    kind         TEXT             NOT NULL,
    actor        TEXT             NOT NULL,
    reason       TEXT,
    ts           BIGINT           NOT NULL,
    attrs        JSON             NOT NULL,
    PRIMARY KEY (tenant, seq)
);
CREATE INDEX events_entity ON events (tenant, entity, entity_id, seq);

CREATE TABLE location_history (
    tenant       TEXT             NOT NULL,
    courier      TEXT             NOT NULL,
    ts           BIGINT           NOT NULL,
    lat          DOUBLE PRECISION NOT NULL,
    lng          DOUBLE PRECISION NOT NULL,
    speed        DOUBLE PRECISION,
    PRIMARY KEY (tenant, courier, ts)
);
CREATE INDEX location_history_ts ON location_history (ts);

-- Market ownership for several nodes (a market is a tenant in this version).
CREATE TABLE leases (
    tenant       TEXT             NOT NULL,
    market       TEXT             NOT NULL,
    node         TEXT             NOT NULL,
    expires_at   BIGINT           NOT NULL,
    PRIMARY KEY (tenant, market)
);
