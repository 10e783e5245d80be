-- name: list_clients
SELECT id, name_enc, role, status, created_at, last_login_at
FROM clients WHERE status <> 'deleted' ORDER BY created_at, id;

-- name: lock_client
SELECT id, name_hash, password_hash, role, status, session_epoch, revision, row_mac
FROM clients WHERE id = %(client_id)s AND status <> 'deleted' FOR UPDATE;

-- name: lock_active_admins
-- Serialises demoting, disabling and deleting admins, so two admins cannot remove each other at once.
SELECT id FROM clients WHERE role = 'admin' AND status = 'active' ORDER BY id FOR UPDATE;

-- name: update_client
-- Every change of what a client may do writes its MAC anew (kms.rows).
UPDATE clients SET name_hash = %(name_hash)s, role = %(role)s, status = %(status)s,
                   session_epoch = %(session_epoch)s, revision = %(revision)s, row_mac = %(row_mac)s
WHERE id = %(id)s;

-- name: purge_deleted_clients
DELETE FROM clients c WHERE c.status = 'deleted'
  AND NOT EXISTS (SELECT 1 FROM keys k WHERE k.client_id = c.id);

-- name: purge_expired_sessions
DELETE FROM sessions WHERE expires_at < now() - interval '1 day';

-- name: purge_old_login_failures
DELETE FROM login_failures WHERE failed_at < now() - %(window)s;

-- name: purge_old_signup_tokens
DELETE FROM signup_tokens WHERE expires_at < now() - interval '30 days';

-- name: purge_expired_legacy_signup_tokens
-- An expired legacy token is refused for its expiry alone; its record is no longer needed.
DELETE FROM legacy_signup_tokens_used WHERE expires_at < now() - interval '1 day';

-- name: client_name_hash
SELECT name_hash FROM clients WHERE id = %(client_id)s AND status <> 'deleted';
