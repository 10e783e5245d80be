-- name: clients_for_row_macs
SELECT id, name_hash, password_hash, role, status, session_epoch, revision FROM clients WHERE row_mac IS NULL;

-- name: set_client_row_mac
UPDATE clients SET row_mac = %(row_mac)s WHERE id = %(id)s;

-- name: sessions_for_row_macs
SELECT jti, client_id, expires_at, epoch, revoked_at IS NOT NULL AS revoked, revision FROM sessions WHERE row_mac IS NULL;

-- name: set_session_row_mac
UPDATE sessions SET row_mac = %(row_mac)s WHERE jti = %(id)s;

-- name: signup_tokens_for_row_macs
SELECT id, token_hash, name_hash, role, expires_at, used_at IS NOT NULL AS used, revision FROM signup_tokens
WHERE row_mac IS NULL;

-- name: set_signup_token_row_mac
UPDATE signup_tokens SET row_mac = %(row_mac)s WHERE id = %(id)s;

-- name: keys_for_row_macs
-- Before migration 009 every key was exportable (and the column does not exist yet).
SELECT id, client_id, ref_hash, current_version, retired_below, deleted_at IS NOT NULL AS deleted, rotation_period_ms,
       true AS exportable, revision
FROM keys WHERE row_mac IS NULL;

-- name: keys_to_remac
SELECT id, client_id, ref_hash, current_version, retired_below, deleted_at IS NOT NULL AS deleted, rotation_period_ms,
       exportable, revision, row_mac
FROM keys WHERE row_mac IS NOT NULL ORDER BY id FOR UPDATE;

-- name: set_key_row_mac
UPDATE keys SET row_mac = %(row_mac)s WHERE id = %(id)s;

-- name: audit_chain_state_for_row_macs
SELECT id, chain_id, started, tampered, revision FROM audit_chain_state WHERE row_mac IS NULL;

-- name: set_audit_chain_state_row_mac
UPDATE audit_chain_state SET row_mac = %(row_mac)s WHERE id = %(id)s;

-- name: rows_needing_macs
SELECT (SELECT count(*) FROM clients) + (SELECT count(*) FROM sessions) + (SELECT count(*) FROM signup_tokens)
       + (SELECT count(*) FROM keys);
