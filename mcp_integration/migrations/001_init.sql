-- The registry of MCP servers, their tool cache, their health, and every tool call as a job.

CREATE TABLE mcp_servers (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9_-]{1,48}$'),
    transport        text NOT NULL CHECK (transport IN ('stdio', 'streamable-http', 'sse', 'websocket')),
    url              text,
    command          text,
    args             jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(args) = 'array'),
    env              jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(env) = 'object'),
    headers          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(headers) = 'object'),
    allowed_tools    text[] NOT NULL DEFAULT '{}',
    enabled          boolean NOT NULL DEFAULT true,
    timeout_ms       integer NOT NULL DEFAULT 35000 CHECK (timeout_ms > 0),
    max_wait_ms      integer NOT NULL DEFAULT 300000 CHECK (max_wait_ms > 0),
    release_after_ms integer NOT NULL DEFAULT 8000 CHECK (release_after_ms >= 0),
    poll_interval    integer NOT NULL DEFAULT 1000 CHECK (poll_interval >= 50),
    result_endpoint  text NOT NULL DEFAULT '/mcp/results',
    poll_profile     text NOT NULL DEFAULT 'auto'
                     CHECK (poll_profile IN ('auto', 'mcp-task', 'http', 'n8n', 'none')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stdio_needs_command CHECK (
        transport <> 'stdio' OR (command IS NOT NULL AND length(btrim(command)) > 0)),
    CONSTRAINT network_needs_url CHECK (
        transport = 'stdio' OR (url IS NOT NULL AND url ~* '^(https?|wss?)://[^/\s]+')),
    CONSTRAINT websocket_url_scheme CHECK (transport <> 'websocket' OR url ~* '^wss?://'),
    CONSTRAINT http_url_scheme CHECK (transport NOT IN ('streamable-http', 'sse') OR url ~* '^https?://')
);

CREATE TABLE mcp_tools (
    server_id     bigint NOT NULL REFERENCES mcp_servers(id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) > 0),
    description   text NOT NULL DEFAULT '',
    input_schema  jsonb NOT NULL CHECK (jsonb_typeof(input_schema) = 'object'),
    meta          jsonb NOT NULL DEFAULT '{}',
    discovered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server_id, name)
);

CREATE TABLE mcp_server_health (
    server_id            bigint PRIMARY KEY REFERENCES mcp_servers(id) ON DELETE CASCADE,
    status               text NOT NULL DEFAULT 'unknown' CHECK (status IN ('up', 'degraded', 'down', 'unknown')),
    checked_at           timestamptz NOT NULL DEFAULT now(),
    latency_ms           double precision,
    consecutive_failures integer NOT NULL DEFAULT 0,
    last_error           text
);

CREATE TABLE mcp_jobs (
    id           uuid PRIMARY KEY,
    -- A job outlives its server's row: history stays when a server is removed.
    server_id    bigint REFERENCES mcp_servers(id) ON DELETE SET NULL,
    server_name  text NOT NULL,
    tool         text NOT NULL,
    kind         text NOT NULL DEFAULT 'plain' CHECK (kind IN ('plain', 'task', 'receipt')),
    receipt      jsonb,
    state        text NOT NULL DEFAULT 'submitted'
                 CHECK (state IN ('submitted', 'working', 'completed', 'failed', 'timed_out', 'cancelled')),
    submitted_at timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    result       jsonb,
    error        text,
    polls        integer NOT NULL DEFAULT 0,
    delivered_late boolean NOT NULL DEFAULT false
);
CREATE INDEX mcp_jobs_recent ON mcp_jobs (submitted_at DESC);
CREATE INDEX mcp_jobs_server_tool ON mcp_jobs (server_name, tool, submitted_at DESC);
