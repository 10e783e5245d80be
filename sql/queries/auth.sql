-- name: authenticate
-- The check behind every authenticated request: the token's session is live and its client
-- active. Role comes from the client's row, never from the token.
SELECT c.id, c.role
FROM sessions s JOIN clients c ON c.id = s.client_id
WHERE s.jti = %(jti)s AND s.client_id = %(client_id)s
  AND s.revoked_at IS NULL AND s.expires_at > now() AND c.status = 'active';

-- name: insert_session
INSERT INTO sessions (jti, client_id, expires_at) VALUES (%(jti)s, %(client_id)s, %(expires_at)s);

-- name: revoke_session
UPDATE sessions SET revoked_at = now() WHERE jti = %(jti)s AND revoked_at IS NULL;

-- name: revoke_client_sessions
UPDATE sessions SET revoked_at = now() WHERE client_id = %(client_id)s AND revoked_at IS NULL;

-- name: insert_signup_token
INSERT INTO signup_tokens (id, token_hash, name_hash, name_enc, role, expires_at, issued_by)
VALUES (%(id)s, %(token_hash)s, %(name_hash)s, %(name_enc)s, %(role)s, %(expires_at)s, %(issued_by)s);

-- name: find_usable_signup_token
SELECT id FROM signup_tokens
WHERE token_hash = %(token_hash)s AND used_at IS NULL AND expires_at > now();

-- name: consume_signup_token
-- SKIP LOCKED: a second signup racing with the same token does not wait, it finds nothing.
UPDATE signup_tokens SET used_at = now()
WHERE id = (SELECT id FROM signup_tokens
            WHERE token_hash = %(token_hash)s AND used_at IS NULL AND expires_at > now()
            FOR UPDATE SKIP LOCKED)
RETURNING id, name_hash, name_enc, role;

-- name: client_exists
SELECT 1 FROM clients WHERE name_hash = %(name_hash)s;

-- name: insert_client
INSERT INTO clients (id, name_hash, name_enc, password_hash, role)
VALUES (%(id)s, %(name_hash)s, %(name_enc)s, %(password_hash)s, %(role)s)
ON CONFLICT (name_hash) DO NOTHING
RETURNING id;

-- name: client_for_login
SELECT id, password_hash, role, status FROM clients WHERE name_hash = %(name_hash)s;

-- name: record_login
UPDATE clients SET last_login_at = now() WHERE id = %(client_id)s;

-- name: lock_login_client
-- A login attempt's reservation is counted and made under these two locks (name first, then
-- address, always in that order), so parallel guesses cannot all pass the check before any of
-- them is counted, in one process or many.
SELECT pg_advisory_xact_lock(7100003, hashtext(%(client)s));

-- name: lock_login_address
SELECT pg_advisory_xact_lock(7100004, hashtext(%(address)s));

-- name: login_failures_in_window
-- Failures (and attempts still being checked) per scope inside the window, and how long until
-- the oldest one leaves it.
SELECT scope, count(*),
       ceil(extract(epoch FROM min(failed_at) + %(window)s - now()))::integer
FROM login_failures
WHERE failed_at > now() - %(window)s
  AND ((scope = 'client' AND subject = %(client)s) OR (scope = 'address' AND subject = %(address)s))
GROUP BY scope;

-- name: reserve_login_attempt
-- Counted as a failure from now on; a login that succeeds takes its reservation back.
INSERT INTO login_failures (scope, subject) VALUES ('client', %(client)s), ('address', %(address)s)
RETURNING id;

-- name: release_login_attempt
DELETE FROM login_failures WHERE id = ANY(%(ids)s);

-- name: clear_client_login_failures
DELETE FROM login_failures WHERE scope = 'client' AND subject = %(client)s;

-- name: active_admin_exists
SELECT EXISTS (SELECT 1 FROM clients WHERE role = 'admin' AND status = 'active');
