-- then: row_macs
-- Freshness (docs/SECURITY.md). A row MAC shows that the KMS wrote a row, not that the row is the
-- newest one the KMS wrote: a database writer could put back an older copy, MAC and all. So every
-- row that grants authority or decides what is served carries a revision, 1 when made and one more
-- at each change, covered by its MAC; and the audit event that records a change names each row it
-- took past revision 1, with that revision (`changes`: "clients:ID@3 keys:12@5"), under the
-- event's MAC and then in the chain. An older copy put back has a lower revision than the audit
-- trail names, and is refused. The MACs of the rows already here are computed anew over the new
-- column by the step named above (with the service's secrets).
ALTER TABLE clients ADD COLUMN revision integer NOT NULL DEFAULT 1 CHECK (revision >= 1);
ALTER TABLE sessions ADD COLUMN revision integer NOT NULL DEFAULT 1 CHECK (revision >= 1);
ALTER TABLE signup_tokens ADD COLUMN revision integer NOT NULL DEFAULT 1 CHECK (revision >= 1);
ALTER TABLE keys ADD COLUMN revision integer NOT NULL DEFAULT 1 CHECK (revision >= 1);
UPDATE clients SET row_mac = NULL;
UPDATE sessions SET row_mac = NULL;
UPDATE signup_tokens SET row_mac = NULL;
UPDATE keys SET row_mac = NULL;

ALTER TABLE audit_events ADD COLUMN changes text;
-- Every process follows the changes of the others (kms.audit.freshness), by transaction id as the
-- sealer does: only transactions that have ended, each range once.
CREATE INDEX audit_events_changes ON audit_events (txid, seq) WHERE changes IS NOT NULL;
DROP TRIGGER audit_events_append_only ON audit_events;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events FOR EACH ROW
  WHEN (NOT (OLD.chain_pos IS NULL AND NEW.chain_pos IS NOT NULL
             AND (NEW.seq, NEW.event_id, NEW.at, NEW.actor, NEW.action, NEW.target, NEW.version, NEW.outcome,
                  NEW.request_id, NEW.source_ip, NEW.repeats, NEW.changes, NEW.row_mac, NEW.txid)
                 IS NOT DISTINCT FROM
                 (OLD.seq, OLD.event_id, OLD.at, OLD.actor, OLD.action, OLD.target, OLD.version, OLD.outcome,
                  OLD.request_id, OLD.source_ip, OLD.repeats, OLD.changes, OLD.row_mac, OLD.txid)))
  EXECUTE FUNCTION audit_events_append_only();

-- The chain's own state, one row under its MAC and revision: which chain this is (a head file
-- names it, so a file of another deployment's chain is never taken for this one's), whether a
-- chain was ever started, so that "no chain yet" can be told from "chain wiped", and a tampering
-- found and not yet acknowledged by an operator (`kms audit acknowledge`), so that it outlives
-- restarts.
CREATE TABLE audit_chain_state (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    chain_id uuid NOT NULL DEFAULT gen_random_uuid(),
    started  boolean NOT NULL,
    tampered text,
    revision integer NOT NULL DEFAULT 1 CHECK (revision >= 1),
    row_mac  bytea
);
INSERT INTO audit_chain_state (started) SELECT EXISTS (SELECT 1 FROM audit_events WHERE chain_pos IS NOT NULL);
