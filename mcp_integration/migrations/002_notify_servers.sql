-- Tell running sessions that the registry changed: a server added, removed, enabled, disabled or edited
-- reaches them within a second, with no restart. The payload is a hint; listeners re-read the table.
CREATE FUNCTION mcp_servers_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mcp_servers_changed',
                      json_build_object('op', TG_OP, 'name', COALESCE(NEW.name, OLD.name))::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER mcp_servers_changed
    AFTER INSERT OR UPDATE OR DELETE ON mcp_servers
    FOR EACH ROW EXECUTE FUNCTION mcp_servers_notify();
