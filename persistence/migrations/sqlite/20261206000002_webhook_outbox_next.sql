-- Claims go webhook by webhook: each one's oldest due rows are a seek here, whatever the
-- backlog (with only (state, next_attempt_at), a claim read and numbered every due row).
CREATE INDEX webhook_outbox_next ON webhook_outbox (tenant, webhook_id, state, next_attempt_at, event_seq);
