-- Pending deliveries not attempted for days (an endpoint whose circuit stays open is probed
-- one row at a time) are given up: this finds them without reading the whole outbox.
CREATE INDEX webhook_outbox_untouched ON webhook_outbox (updated_at) WHERE state = 'pending';

-- A new outbox row's `updated_at` is when it was queued (the database's clock), not the
-- event's time: an event may be days old when it is appended (a phone's offline buffer), and
-- giving up counts from the last attempt, or from the queueing.
CREATE OR REPLACE FUNCTION events_to_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_outbox (tenant, webhook_id, event_seq, state, attempts, next_attempt_at, updated_at)
    SELECT DISTINCT e.tenant, s.webhook_id, e.seq, 'pending', 0, e.ts, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
    FROM new_events e
    JOIN webhook_events s ON s.tenant = e.tenant
        AND (s.pattern = e.kind OR (s.prefix IS NOT NULL AND substr(e.kind, 1, length(s.prefix)) = s.prefix))
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
