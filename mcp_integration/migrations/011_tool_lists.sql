-- Each server's last tools/list answer that it let clients reuse (2026-07-28 `ttlMs`), as the SDK's response cache
-- held it (tool_lists.py): a session starting before `expires_at`, on the same protocol version, with the server's
-- row unedited since `stored_at`, takes it without asking the server. A table of its own, not a column of
-- mcp_servers: writing it must not move mcp_servers.updated_at, which makes every worker re-connect the server.
CREATE TABLE mcp_tool_lists (
    server_id        bigint PRIMARY KEY REFERENCES mcp_servers(id) ON DELETE CASCADE,
    protocol_version text NOT NULL,
    result           jsonb NOT NULL CHECK (jsonb_typeof(result) = 'object'),
    scope            text NOT NULL CHECK (scope IN ('public', 'private')),
    expires_at       timestamptz NOT NULL,
    stored_at        timestamptz NOT NULL DEFAULT now()
);
