-- How each server authenticates, and the OAuth state of those that use OAuth 2.1.
--
-- `auth`: none, header (fixed headers, values as env: references) or oauth (the settings in `oauth`, secrets
-- in them as env: references too). Existing servers with headers are taken to authenticate by header.
ALTER TABLE mcp_servers
    ADD COLUMN auth  text  NOT NULL DEFAULT 'none' CHECK (auth IN ('none', 'header', 'oauth')),
    ADD COLUMN oauth jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(oauth) = 'object');
UPDATE mcp_servers SET auth = 'header' WHERE headers <> '{}'::jsonb;
ALTER TABLE mcp_servers
    ADD CONSTRAINT oauth_is_http CHECK (auth <> 'oauth' OR transport IN ('streamable-http', 'sse'));

-- One row per OAuth server, shared by every worker. `tokens` and `client` are sealed (Fernet, with the key in
-- VOICE_MCP_SECRET_KEY) and name the server they belong to inside the seal; the other columns say nothing
-- secret and are what the CLI and the status page show. A refresh runs under an advisory lock keyed on the
-- server id, so a rotating refresh token is used once however many workers see the expiry.
CREATE TABLE mcp_oauth (
    server_id    bigint PRIMARY KEY REFERENCES mcp_servers(id) ON DELETE CASCADE,
    tokens       bytea,
    client       bytea,
    -- The metadata discovered at login (protected resource, authorization server): a worker refreshes at the
    -- right token endpoint, with the right resource, without discovering again. Public documents.
    metadata     jsonb NOT NULL DEFAULT '{}',
    expires_at   timestamptz,
    scope        text,
    issuer       text,
    subject      text,
    needs_login  boolean NOT NULL DEFAULT false,
    needed_scope text,
    reason       text,
    refreshes    bigint NOT NULL DEFAULT 0,
    logged_in_at timestamptz,
    refreshed_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A server that only a person can let us use again (its refresh refused, a scope asked for) is neither up nor
-- down: it says so.
ALTER TABLE mcp_server_health DROP CONSTRAINT mcp_server_health_status_check;
ALTER TABLE mcp_server_health ADD CONSTRAINT mcp_server_health_status_check
    CHECK (status IN ('up', 'degraded', 'down', 'unknown', 'needs_login'));
