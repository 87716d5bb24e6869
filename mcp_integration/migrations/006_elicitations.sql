-- A server's questions to the caller during a call (elicitation), kept with the job: each question's message,
-- fields and outcome (accept, decline, cancel), and the answer except for fields that look secret.
ALTER TABLE mcp_jobs ADD COLUMN elicitations jsonb;
