-- Market leases between nodes (a market is a tenant): the node whose lease is live owns the
-- market's dispatch. Times are Unix ms on the DATABASE clock (never a node's). Rows are never
-- deleted (a release sets expires_at to 0), so a market's epoch, the fencing token, only grows.
-- Supersedes the unused `leases` table of the initial schema.
CREATE TABLE market_leases (
    tenant       TEXT             PRIMARY KEY,
    holder       TEXT             NOT NULL,
    addr         TEXT             NOT NULL, -- base URL the holder advertises to other nodes
    epoch        BIGINT           NOT NULL,
    expires_at   BIGINT           NOT NULL,
    acquired_at  BIGINT           NOT NULL  -- when this epoch began
);
