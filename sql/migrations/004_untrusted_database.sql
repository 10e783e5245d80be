-- then: row_macs_from_007
-- The database is untrusted storage (docs/SECURITY.md): every row that grants authority or
-- decides what is served carries a MAC (row_mac) under a key derived from DB_SECRET, bound to its
-- table and identity, over every column that matters. The MACs of the rows already here are computed
-- by migration 007, over the columns as they are from then on; the step named above only checks
-- that the service's secrets are the ones the stored data was written with.

-- A client's session epoch: disabling, deleting or re-roling a client moves it on, and every
-- session of an earlier epoch stops working. Both are under the MACs.
ALTER TABLE clients ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;
ALTER TABLE clients ADD COLUMN row_mac bytea;
ALTER TABLE sessions ADD COLUMN epoch integer NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN row_mac bytea;
ALTER TABLE signup_tokens ADD COLUMN row_mac bytea;

-- Which versions are in use, served or retired follows from the key row alone (under its MAC):
-- current_version is in use, versions below retired_below are retired, the rest deprecated.
-- key_versions.state stays for queries and display; it is never trusted for a decision.
ALTER TABLE keys ADD COLUMN retired_below integer NOT NULL DEFAULT 1 CHECK (retired_below >= 1);
ALTER TABLE keys ADD COLUMN row_mac bytea;
UPDATE keys k SET retired_below = coalesce(
    (SELECT max(v.version) + 1 FROM key_versions v WHERE v.key_id = k.id AND v.state = 'retired'), 1);

-- Sessions of an epoch that has passed are dead; nothing marks them one by one any more.
DROP INDEX sessions_live_by_client;

-- The audit chain (chain format 2) also covers each row's seq and the id of the transaction that
-- wrote it; the sealer chains rows in transaction order, only from transactions that have ended,
-- so an unsealed row older than the chain's head can only have been put there out of band.
ALTER TABLE audit_events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE audit_events ADD COLUMN chain_format smallint;
UPDATE audit_events SET chain_format = 1 WHERE chain_pos IS NOT NULL;
ALTER TABLE audit_events ADD CONSTRAINT audit_events_chain_format
    CHECK ((chain_pos IS NULL) = (chain_format IS NULL));
CREATE UNIQUE INDEX audit_events_event_id ON audit_events (event_id);
DROP INDEX audit_events_unsealed;
CREATE INDEX audit_events_unsealed ON audit_events (txid, seq) WHERE chain_pos IS NULL;

-- Append-only for everyone but a superuser or the table's owner disabling it: a row may be
-- sealed once (chain columns set from NULL, nothing else changed); never updated otherwise,
-- deleted or truncated. A writer who drops the trigger is still caught by `audit verify`.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' AND OLD.chain_pos IS NULL AND NEW.chain_pos IS NOT NULL
     AND (NEW.seq, NEW.event_id, NEW.at, NEW.actor, NEW.action, NEW.target, NEW.version, NEW.outcome,
          NEW.request_id, NEW.source_ip, NEW.repeats, NEW.row_mac, NEW.txid)
         IS NOT DISTINCT FROM
         (OLD.seq, OLD.event_id, OLD.at, OLD.actor, OLD.action, OLD.target, OLD.version, OLD.outcome,
          OLD.request_id, OLD.source_ip, OLD.repeats, OLD.row_mac, OLD.txid) THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
  FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
  FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
