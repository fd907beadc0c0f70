-- When a courier or a dispatcher last handed an order back to dispatch (`release`): its
-- waiting time, after which an unassigned order expires, restarts there. Nullable without a
-- default, so adding it does not rewrite the table.
ALTER TABLE orders ADD COLUMN released_at BIGINT;
