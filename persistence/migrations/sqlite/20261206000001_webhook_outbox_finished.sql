-- The purge of finished deliveries (delivered or dead, oldest first) reads this instead of
-- the whole outbox.
CREATE INDEX webhook_outbox_finished ON webhook_outbox (updated_at) WHERE state <> 'pending';
