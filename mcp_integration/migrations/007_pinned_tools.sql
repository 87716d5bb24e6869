-- Tools offered to the LLM on every turn, even when the registry holds more tools than a turn's budget.
ALTER TABLE mcp_servers ADD COLUMN pinned_tools text[] NOT NULL DEFAULT '{}';
