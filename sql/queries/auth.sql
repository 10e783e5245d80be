-- name: authenticate
-- The check behind every authenticated request: the token's session is live and its client
-- active. Role comes from the client's row, never from the token. Both rows come with what their
-- MACs cover (kms.rows), and the service checks them before it believes any of it.
SELECT s.jti AS session_jti, s.client_id AS session_client_id, s.expires_at AS session_expires_at,
       s.epoch AS session_epoch, s.revoked_at IS NOT NULL AS session_revoked, s.revision AS session_revision,
       s.row_mac AS session_row_mac, c.id AS client_id, c.name_hash AS client_name_hash, c.password_hash AS client_password_hash,
       c.role AS client_role, c.status AS client_status, c.session_epoch AS client_session_epoch,
       c.revision AS client_revision, c.row_mac AS client_row_mac
FROM sessions s JOIN clients c ON c.id = s.client_id
WHERE s.jti = %(jti)s AND s.client_id = %(client_id)s
  AND s.revoked_at IS NULL AND s.expires_at > now() AND c.status = 'active' AND s.epoch = c.session_epoch;

-- name: insert_session
INSERT INTO sessions (jti, client_id, expires_at, epoch, revision, row_mac)
VALUES (%(jti)s, %(client_id)s, %(expires_at)s, %(epoch)s, %(revision)s, %(row_mac)s);

-- name: revoke_session
UPDATE sessions SET revoked_at = now(), revision = %(revision)s, row_mac = %(row_mac)s
WHERE jti = %(jti)s AND revoked_at IS NULL;

-- name: insert_signup_token
INSERT INTO signup_tokens (id, token_hash, name_hash, name_enc, role, expires_at, issued_by, row_mac)
VALUES (%(id)s, %(token_hash)s, %(name_hash)s, %(name_enc)s, %(role)s, %(expires_at)s, %(issued_by)s, %(row_mac)s);

-- name: find_usable_signup_token
SELECT id FROM signup_tokens
WHERE token_hash = %(token_hash)s AND used_at IS NULL AND expires_at > now();

-- name: lock_usable_signup_token
-- SKIP LOCKED: a second signup racing with the same token does not wait, it finds nothing.
SELECT id, token_hash, name_hash, name_enc, role, expires_at, used_at IS NOT NULL AS used, revision, row_mac
FROM signup_tokens
WHERE token_hash = %(token_hash)s AND used_at IS NULL AND expires_at > now()
FOR UPDATE SKIP LOCKED;

-- name: use_signup_token
UPDATE signup_tokens SET used_at = now(), revision = %(revision)s, row_mac = %(row_mac)s WHERE id = %(id)s;

-- name: client_exists
SELECT 1 FROM clients WHERE name_hash = %(name_hash)s;

-- name: insert_client
INSERT INTO clients (id, name_hash, name_enc, password_hash, role, row_mac)
VALUES (%(id)s, %(name_hash)s, %(name_enc)s, %(password_hash)s, %(role)s, %(row_mac)s)
ON CONFLICT (name_hash) DO NOTHING
RETURNING id;

-- name: client_for_login
SELECT id, name_hash, password_hash, role, status, session_epoch, revision, row_mac FROM clients
WHERE name_hash = %(name_hash)s;

-- name: replace_imported_password
-- An imported client's first login: its bcrypt hash gives way to an Argon2id one, unless the row
-- changed since it was read (then the next login tries again).
UPDATE clients SET password_hash = %(password_hash)s, revision = %(revision)s, row_mac = %(row_mac)s
WHERE id = %(id)s AND password_hash = %(imported_hash)s AND row_mac = %(old_row_mac)s;

-- name: record_login
UPDATE clients SET last_login_at = now() WHERE id = %(client_id)s;

-- name: lock_login_address
-- An attempt is counted against its source address before its password is checked, under this
-- lock, so parallel guesses cannot all pass the check before any of them is counted.
SELECT pg_advisory_xact_lock(7100004, hashtext(%(address)s));

-- name: lock_login_client
-- Held while the password is checked: attempts on one client name take turns, so each sees every
-- earlier failure, in one process or many. Waits at most 2 s (the caller then gets 429).
SET LOCAL lock_timeout TO '2s';
SELECT pg_advisory_xact_lock(7100003, hashtext(%(client)s));

-- name: login_failures_in_window
-- Failures (and attempts still being checked) in the window for one scope and subject, and how
-- long until the oldest one leaves it.
SELECT count(*) AS failures, ceil(extract(epoch FROM min(failed_at) + %(window)s - now()))::integer AS seconds_left
FROM login_failures
WHERE scope = %(scope)s AND subject = %(subject)s AND failed_at > now() - %(window)s;

-- name: login_check
-- Sent after lock_login_client, in the same round trip: the name's failures in the window (and
-- seconds until the oldest leaves it), then the client row with what its MAC covers, if any, and
-- whether any client still has a bcrypt hash from the original KMS (an index that is empty then).
SELECT f.failures, f.seconds_left, c.id AS client_id, c.name_hash AS client_name_hash,
       c.password_hash AS client_password_hash, c.role AS client_role, c.status AS client_status,
       c.session_epoch AS client_session_epoch, c.revision AS client_revision, c.row_mac AS client_row_mac,
       EXISTS (SELECT 1 FROM clients WHERE starts_with(password_hash, '$2')) AS imported_passwords_remain
FROM (SELECT count(*) AS failures,
             ceil(extract(epoch FROM min(failed_at) + %(window)s - now()))::integer AS seconds_left
      FROM login_failures
      WHERE scope = 'client' AND subject = %(client)s AND failed_at > now() - %(window)s) f
LEFT JOIN clients c ON c.name_hash = %(name_hash)s;

-- name: insert_login_failure
INSERT INTO login_failures (scope, subject) VALUES (%(scope)s, %(subject)s) RETURNING id;

-- name: release_login_attempt
DELETE FROM login_failures WHERE id = %(id)s;

-- name: clear_client_login_failures
DELETE FROM login_failures WHERE scope = 'client' AND subject = %(client)s;

-- name: active_admin_exists
SELECT EXISTS (SELECT 1 FROM clients WHERE role = 'admin' AND status = 'active') AS found;

-- name: legacy_signup_token_used
SELECT 1 FROM legacy_signup_tokens_used WHERE token_hash = %(token_hash)s;

-- name: use_legacy_signup_token
-- Nothing returned: another signup used it first.
INSERT INTO legacy_signup_tokens_used (token_hash, expires_at) VALUES (%(token_hash)s, %(expires_at)s)
ON CONFLICT (token_hash) DO NOTHING
RETURNING 1;
