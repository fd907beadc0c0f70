-- Webhooks: subscriptions, the event kinds each one wants, and the outbox of deliveries.
-- Outbox rows are inserted by a trigger on `events` (below), in the same transaction as the
-- events they deliver, so an event that is durable is also due for delivery.

CREATE TABLE webhooks (
    tenant       TEXT             NOT NULL,
    id           TEXT             NOT NULL,
    url          TEXT             NOT NULL,
    secret       TEXT             NOT NULL,
    events       TEXT             NOT NULL,
    created_at   INTEGER          NOT NULL,
    updated_at   INTEGER          NOT NULL,
    PRIMARY KEY (tenant, id)
);

-- One row per subscribed pattern: `pattern` is an exact kind (`order.delivered`), or ends in
-- `*` (`order.*`, `*`), in which case `prefix` holds what precedes the star.
CREATE TABLE webhook_events (
    tenant       TEXT             NOT NULL,
    webhook_id   TEXT             NOT NULL,
    pattern      TEXT             NOT NULL,
    prefix       TEXT,
    PRIMARY KEY (tenant, webhook_id, pattern),
    FOREIGN KEY (tenant, webhook_id) REFERENCES webhooks (tenant, id) ON DELETE CASCADE
);
CREATE INDEX webhook_events_tenant ON webhook_events (tenant);

-- state: pending → delivered | dead. A claimed row carries the claimer's `lease` token and
-- `next_attempt_at` is pushed past the delivery timeout, so a node that dies mid-delivery
-- leaves it due again (at-least-once).
CREATE TABLE webhook_outbox (
    tenant          TEXT          NOT NULL,
    webhook_id      TEXT          NOT NULL,
    event_seq       INTEGER       NOT NULL,
    state           TEXT          NOT NULL,
    attempts        INTEGER       NOT NULL,
    next_attempt_at INTEGER       NOT NULL,
    lease           TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    updated_at      INTEGER       NOT NULL,
    PRIMARY KEY (tenant, webhook_id, event_seq),
    -- The trigger's insert locks the webhook row (PostgreSQL), so a delete racing an event
    -- either sees the new rows or cascades to them: no orphan deliveries.
    FOREIGN KEY (tenant, webhook_id) REFERENCES webhooks (tenant, id) ON DELETE CASCADE
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at);
CREATE INDEX webhook_outbox_lease ON webhook_outbox (lease);

-- The outbox is filled by the database itself: whatever inserts events, in the same
-- transaction, every webhook of the tenant with a matching pattern gets one pending row per
-- event.
CREATE TRIGGER events_to_webhook_outbox AFTER INSERT ON events
BEGIN
    INSERT INTO webhook_outbox (tenant, webhook_id, event_seq, state, attempts, next_attempt_at, updated_at)
    SELECT DISTINCT s.tenant, s.webhook_id, NEW.seq, 'pending', 0, NEW.ts, NEW.ts
    FROM webhook_events s
    WHERE s.tenant = NEW.tenant
        AND (s.pattern = NEW.kind OR (s.prefix IS NOT NULL AND substr(NEW.kind, 1, length(s.prefix)) = s.prefix))
    ON CONFLICT DO NOTHING;
END;
