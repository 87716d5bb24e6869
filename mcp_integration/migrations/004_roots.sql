-- The roots a server may work in (MCP `roots/list`), as file:// URIs or absolute paths. Empty: we declare the
-- roots capability and answer with no roots, so filesystem-style servers keep the directories they were given.
ALTER TABLE mcp_servers ADD COLUMN roots text[] NOT NULL DEFAULT '{}';
