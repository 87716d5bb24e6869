-- Every health check, kept for a day: the status page draws each server's latency over the last hour from it.
-- The latest state per server stays in mcp_server_health.
CREATE TABLE mcp_health_checks (
    server_id  bigint NOT NULL REFERENCES mcp_servers(id) ON DELETE CASCADE,
    checked_at timestamptz NOT NULL DEFAULT now(),
    ok         boolean NOT NULL,
    latency_ms double precision
);
CREATE INDEX mcp_health_checks_recent ON mcp_health_checks (server_id, checked_at DESC);
