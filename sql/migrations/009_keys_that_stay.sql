-- then: key_row_macs
-- Keys that never leave the KMS: a key whose DEK is never returned (exportable false) is used only
-- through the server-side operations. The flag is under the key row's MAC (kms.rows.KEYS), so a
-- database writer cannot turn it back on; the step named above re-MACs each stored key row over
-- the new declaration, once its MAC over the earlier one checks out.
ALTER TABLE keys ADD COLUMN exportable boolean NOT NULL DEFAULT true;

-- One audit event stands for a batch of operations: what it touched and how it went, as JSON
-- (item count, failures, versions, context keys; never a plaintext, ciphertext or context value).
-- Under the event's row MAC when set, as `repeats` is.
ALTER TABLE audit_events ADD COLUMN detail text;

-- The append-only rule of migration 007, with the new column among those a sealer may not change.
DROP TRIGGER audit_events_append_only ON audit_events;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events FOR EACH ROW
  WHEN (NOT (OLD.chain_pos IS NULL AND NEW.chain_pos IS NOT NULL
             AND (NEW.seq, NEW.event_id, NEW.at, NEW.actor, NEW.action, NEW.target, NEW.version, NEW.outcome,
                  NEW.request_id, NEW.source_ip, NEW.repeats, NEW.changes, NEW.detail, NEW.row_mac, NEW.txid)
                 IS NOT DISTINCT FROM
                 (OLD.seq, OLD.event_id, OLD.at, OLD.actor, OLD.action, OLD.target, OLD.version, OLD.outcome,
                  OLD.request_id, OLD.source_ip, OLD.repeats, OLD.changes, OLD.detail, OLD.row_mac, OLD.txid)))
  EXECUTE FUNCTION audit_events_append_only();
