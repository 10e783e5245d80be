-- name: remember_secret_check
INSERT INTO secret_checks (name, check_value) VALUES (%(name)s, %(check_value)s)
ON CONFLICT (name) DO NOTHING;

-- name: secret_checks
SELECT name, check_value FROM secret_checks;

-- name: kek_versions_in_use
SELECT DISTINCT kek_version FROM key_versions WHERE wrapped_dek IS NOT NULL;

-- name: operational_backlog
-- For /metrics: the cron's backlog (as keys_due_for_rotation and destroy_due_keys select) and
-- the audit events not yet sealed.
SELECT
    (SELECT count(*) FROM keys k JOIN key_versions v ON v.key_id = k.id AND v.version = k.current_version
     WHERE k.rotation_period_ms IS NOT NULL AND k.deleted_at IS NULL
       AND v.created_at + k.rotation_period_ms * interval '1 millisecond' <= now()),
    (SELECT count(*) FROM keys WHERE destroy_after <= now()),
    (SELECT count(*) FROM audit_events WHERE chain_pos IS NULL),
    (SELECT extract(epoch FROM now() - min(at)) FROM audit_events WHERE chain_pos IS NULL);
