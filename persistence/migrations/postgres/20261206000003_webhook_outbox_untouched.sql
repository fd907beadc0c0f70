-- Pending deliveries nothing has touched for days (an endpoint whose circuit stays open is
-- probed one row at a time) are given up, oldest first: this finds them without reading the
-- whole outbox.
CREATE INDEX webhook_outbox_untouched ON webhook_outbox (updated_at) WHERE state = 'pending';
