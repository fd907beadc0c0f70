-- Pending deliveries not attempted for days (an endpoint whose circuit stays open is probed
-- one row at a time) are given up: this finds them without reading the whole outbox.
CREATE INDEX webhook_outbox_untouched ON webhook_outbox (updated_at) WHERE state = 'pending';

-- A new outbox row's `updated_at` is when it was queued (the database's clock), not the
-- event's time: an event may be days old when it is appended (a phone's offline buffer), and
-- giving up counts from the last attempt, or from the queueing.
DROP TRIGGER events_to_webhook_outbox;
CREATE TRIGGER events_to_webhook_outbox AFTER INSERT ON events
BEGIN
    INSERT INTO webhook_outbox (tenant, webhook_id, event_seq, state, attempts, next_attempt_at, updated_at)
    SELECT DISTINCT s.tenant, s.webhook_id, NEW.seq, 'pending', 0, NEW.ts, CAST(unixepoch('subsec') * 1000 AS INTEGER)
    FROM webhook_events s
    WHERE s.tenant = NEW.tenant
        AND (s.pattern = NEW.kind OR (s.prefix IS NOT NULL AND substr(NEW.kind, 1, length(s.prefix)) = s.prefix))
    ON CONFLICT DO NOTHING;
END;
