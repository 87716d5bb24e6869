-- What each server negotiated when it last connected (protocol_memory.py), so the next connect, in any process,
-- skips the `server/discover` probe (a handshake-era server) or every handshake round trip (a 2026-07-28 one).
-- A table of its own, not a column of mcp_servers: writing it must not move mcp_servers.updated_at, which makes
-- every worker re-connect the server. `fingerprint` is where the server was (transport, URL, command,
-- arguments) when this was learned: a row that no longer matches its server is ignored, and replaced on the
-- next connect.
CREATE TABLE mcp_server_protocol (
    server_id        bigint PRIMARY KEY REFERENCES mcp_servers(id) ON DELETE CASCADE,
    fingerprint      text NOT NULL,
    era              text NOT NULL CHECK (era IN ('legacy', 'modern')),
    protocol_version text NOT NULL,
    -- modern: the server's DiscoverResult as JSON (handed back to the SDK as `prior_discover`)
    discover         jsonb,
    seen_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT discover_for_modern CHECK (
        (era = 'modern' AND jsonb_typeof(discover) = 'object') OR (era = 'legacy' AND discover IS NULL))
);
