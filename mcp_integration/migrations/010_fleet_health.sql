-- One health checker per server for the whole fleet (health_lease.py): a lease row per server says which
-- monitor checks it, from which database session (a dead process's session vanishes, and its lease with it),
-- until when, and when the next check is due.
CREATE TABLE mcp_health_leases (
    server_id   bigint PRIMARY KEY REFERENCES mcp_servers(id) ON DELETE CASCADE,
    holder      text,
    holder_pid  integer,
    held_until  timestamptz,
    due_at      timestamptz NOT NULL DEFAULT now()
);

-- Tell every process when a server's status changes (the breaker is shared): the checker writes the verdict,
-- everyone else adopts it within a second. The schema is in the payload because NOTIFY channels are per
-- database, and one database may hold several registries (one per schema).
CREATE FUNCTION mcp_health_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify('mcp_health_changed',
                          json_build_object('schema', TG_TABLE_SCHEMA, 'server_id', NEW.server_id,
                                            'status', NEW.status,
                                            'failures', NEW.consecutive_failures)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER mcp_health_changed
    AFTER INSERT OR UPDATE ON mcp_server_health
    FOR EACH ROW EXECUTE FUNCTION mcp_health_notify();
