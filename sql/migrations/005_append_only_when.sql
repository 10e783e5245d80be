-- The append-only trigger decides in its WHEN clause, which PostgreSQL evaluates without calling
-- the function: the sealer's updates (chain columns set from NULL, nothing else changed, the only
-- updates allowed) no longer run PL/pgSQL for every row they seal. The function is called only for
-- what is refused, so it only raises: the rule is written once, here.
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP;
END $$;
DROP TRIGGER audit_events_append_only ON audit_events;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events FOR EACH ROW
  WHEN (NOT (OLD.chain_pos IS NULL AND NEW.chain_pos IS NOT NULL
             AND (NEW.seq, NEW.event_id, NEW.at, NEW.actor, NEW.action, NEW.target, NEW.version, NEW.outcome,
                  NEW.request_id, NEW.source_ip, NEW.repeats, NEW.row_mac, NEW.txid)
                 IS NOT DISTINCT FROM
                 (OLD.seq, OLD.event_id, OLD.at, OLD.actor, OLD.action, OLD.target, OLD.version, OLD.outcome,
                  OLD.request_id, OLD.source_ip, OLD.repeats, OLD.row_mac, OLD.txid)))
  EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
  FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
