-- Sampling (a server asking the session's LLM for a completion): off unless a server's row allows it, and each
-- exchange's shape (never its content) kept with the job.
ALTER TABLE mcp_servers ADD COLUMN allow_sampling boolean NOT NULL DEFAULT false;
ALTER TABLE mcp_jobs ADD COLUMN samplings jsonb;
