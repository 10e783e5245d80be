-- name: lookup_key
-- The hot path in one statement and one round trip: the token check, the key, its current version,
-- the requested one, and the audit record of a successful look-up. Its MAC is made beforehand over
-- the same values: action 'key.lookup', outcome 'success', the caller as actor and the hashed
-- reference in hex as target. The service records refusals itself.
-- Session, client and key rows come with what their MACs cover; the service checks them before
-- it believes any of it (kms.rows). Which version is current and which are retired is read off
-- the key row, never off key_versions.state, and `superseded` (the version after the current one
-- exists) shows that the key row was put back from an older copy. Versions are only ever added one
-- after the other, so this probe of one primary-key entry says what max(version) would, for less
-- work. (A writer who also deletes the newer versions defeats either check, and destroys their
-- DEKs: docs/SECURITY.md.)
-- No row at all means the token is not live; outcome says what the caller gets: 'kek_unavailable'
-- when a version to serve is wrapped under a KEK version the server does not hold (`keks`), so
-- that nothing is recorded as served (kms.keys.kek_holders); 'not_exportable' for a key that
-- gives no DEK (the server-side operations use it).
-- A grantee's look-up (`shared`: `owner_id` is another client's, named `{owner}:{ref}`) also reads
-- the owner's client row (it must be active, under that name; read by the id the name was resolved
-- to, key or no key, so that a key that does not exist costs what one without a grant does) and
-- the caller's live grant on the key, with what their MACs cover: without a grant for 'fetch',
-- unexpired, it is 'not_found', as for no key at all; 'grant_changed' when the grant is not the one `grant_id` expected (the
-- service's audit record names it), so the service records nothing yet, learns it and asks again.
-- Of the session and client rows, only the columns the WHERE clause does not pin already come back
-- (the caller's ids are the token's, a live session is not revoked, an active client's epoch is
-- its session's); the expiry comes as text, as building a datetime costs more than the check, and
-- a row already verified is recognised by its text (kms.rows). Every column carried costs, so
-- `found` names its columns rather than taking caller.*: it is materialised (read twice).
WITH caller AS (
    SELECT s.jti, s.client_id AS s_client, s.expires_at, s.epoch, s.revoked_at IS NOT NULL AS revoked,
           s.revision AS s_revision, s.row_mac AS s_mac, c.id, c.name_hash, c.password_hash, c.role, c.status,
           c.session_epoch, c.revision AS c_revision, c.row_mac AS c_mac
    FROM sessions s JOIN clients c ON c.id = s.client_id
    WHERE s.jti = %(jti)s AND s.client_id = %(client_id)s
      AND s.revoked_at IS NULL AND s.expires_at > now() AND c.status = 'active' AND s.epoch = c.session_epoch
), found AS (
    SELECT caller.expires_at, caller.epoch, caller.s_revision, caller.s_mac, caller.name_hash, caller.password_hash,
           caller.role, caller.c_revision, caller.c_mac, k.id AS key_id, k.current_version, k.retired_below,
           k.rotation_period_ms, k.exportable, k.revision AS k_revision, k.row_mac AS k_mac, nxt.version IS NOT NULL AS superseded,
           k.rotation_period_ms IS NOT NULL
             AND cur.created_at + k.rotation_period_ms * interval '1 millisecond' <= now() AS rotation_due,
           cur.kek_version AS cur_kek, cur.wrapped_dek AS cur_wrapped,
           req.version AS req_version, req.kek_version AS req_kek, req.wrapped_dek AS req_wrapped,
           shared.o_name_hash, shared.o_password_hash, shared.o_role, shared.o_status, shared.o_epoch,
           shared.o_revision, shared.o_mac, shared.grant_id, shared.g_operations, shared.g_expires_at, shared.g_context,
           shared.g_revision, shared.g_mac,
           CASE WHEN k.id IS NULL OR (%(version)s::integer IS NOT NULL AND req.version IS NULL) THEN 'not_found'
                WHEN %(shared)s::boolean AND (shared.grant_id IS NULL OR shared.o_status <> 'active'
                                              OR NOT 'fetch' = ANY(shared.g_operations)
                                              OR shared.g_expires_at <= now()) THEN 'not_found'
                WHEN %(shared)s::boolean AND shared.grant_id IS DISTINCT FROM %(grant_id)s::uuid THEN 'grant_changed'
                WHEN NOT k.exportable THEN 'not_exportable'
                WHEN %(version)s::integer < k.retired_below THEN 'gone'
                WHEN NOT cur.kek_version = ANY(%(keks)s::integer[])
                  OR NOT req.kek_version = ANY(%(keks)s::integer[]) THEN 'kek_unavailable'
                ELSE 'success' END AS outcome
    FROM caller
    LEFT JOIN keys k ON k.client_id = %(owner_id)s::uuid AND k.ref_hash = %(ref_hash)s AND k.deleted_at IS NULL
    LEFT JOIN LATERAL (
        SELECT o.name_hash AS o_name_hash, o.password_hash AS o_password_hash, o.role AS o_role, o.status AS o_status,
               o.session_epoch AS o_epoch, o.revision AS o_revision, o.row_mac AS o_mac, g.id AS grant_id,
               g.operations AS g_operations, g.expires_at AS g_expires_at, g.context_subset AS g_context,
               g.revision AS g_revision, g.row_mac AS g_mac
        FROM clients o
        LEFT JOIN grants g ON g.key_id = k.id AND g.grantee_id = caller.id AND g.revoked_at IS NULL
        WHERE %(shared)s::boolean AND o.id = %(owner_id)s::uuid AND o.name_hash = %(owner_name_hash)s::bytea
    ) shared ON true
    LEFT JOIN key_versions cur ON cur.key_id = k.id AND cur.version = k.current_version
    LEFT JOIN key_versions nxt ON nxt.key_id = k.id AND nxt.version = k.current_version + 1
    LEFT JOIN key_versions req ON req.key_id = k.id AND req.version = %(version)s::integer
), audited AS (
    INSERT INTO audit_events (event_id, at, actor, action, target, version, outcome, request_id, source_ip, detail,
                              row_mac)
    SELECT %(event_id)s::uuid, %(at)s::timestamptz, %(client_id)s::text, 'key.lookup', encode(%(ref_hash)s, 'hex'),
           %(version)s::integer, 'success', %(request_id)s::uuid, %(source_ip)s::text, %(detail)s::text,
           %(row_mac)s::bytea
    FROM found WHERE outcome = 'success' AND %(audit)s::boolean
)
SELECT expires_at::text AS session_expires_at, epoch AS session_epoch, s_revision AS session_revision,
       s_mac AS session_row_mac, name_hash AS client_name_hash, password_hash AS client_password_hash,
       role AS client_role, c_revision AS client_revision, c_mac AS client_row_mac, key_id,
       current_version AS key_current_version, retired_below AS key_retired_below,
       rotation_period_ms AS key_rotation_period_ms, exportable AS key_exportable,
       k_revision AS key_revision, k_mac AS key_row_mac,
       superseded, rotation_due, cur_kek, cur_wrapped, req_version, req_kek, req_wrapped, outcome,
       o_name_hash, o_password_hash, o_role, o_status, o_epoch, o_revision, o_mac, grant_id, g_operations,
       g_expires_at, g_context, g_revision, g_mac
FROM found;

-- name: lock_generate
-- Parallel generates of one reference: the first takes this lock, the others see it taken and
-- answer 409 at once instead of waiting on its transaction.
SELECT pg_try_advisory_xact_lock(%(lock_key)s) AS locked;

-- name: insert_key
INSERT INTO keys (client_id, ref_hash, ref_enc) VALUES (%(client_id)s, %(ref_hash)s, %(ref_enc)s)
ON CONFLICT (client_id, ref_hash) DO NOTHING
RETURNING id;

-- name: update_key
-- Every change of what a key serves writes its MAC anew (kms.rows).
UPDATE keys SET current_version = %(current_version)s, retired_below = %(retired_below)s,
                rotation_period_ms = %(rotation_period_ms)s, exportable = %(exportable)s, revision = %(revision)s,
                row_mac = %(row_mac)s,
                deleted_at = CASE WHEN %(deleted)s THEN coalesce(deleted_at, now()) END,
                destroy_after = CASE WHEN %(deleted)s THEN coalesce(destroy_after, now() + %(wait)s) END
WHERE id = %(id)s;

-- name: insert_key_version
INSERT INTO key_versions (key_id, version, state, kek_version, wrapped_dek)
VALUES (%(key_id)s, %(version)s, 'in-use', %(kek_version)s, %(wrapped_dek)s);

-- name: lock_key
-- The caller's key row with what its MAC covers (kms.rows), locked: rotations queue here.
SELECT id, client_id, ref_hash, current_version, retired_below, deleted_at IS NOT NULL AS deleted,
       rotation_period_ms, exportable, revision, row_mac
FROM keys
WHERE client_id = %(client_id)s AND ref_hash = %(ref_hash)s AND (deleted_at IS NULL) <> %(deleted)s
FOR UPDATE;

-- name: lock_key_if_free
SELECT k.id, k.client_id, k.ref_hash, k.current_version, k.retired_below, false AS deleted, k.rotation_period_ms,
       k.exportable, revision, k.row_mac, k.rotation_period_ms IS NOT NULL
         AND v.created_at + k.rotation_period_ms * interval '1 millisecond' <= now() AS due
FROM keys k JOIN key_versions v ON v.key_id = k.id AND v.version = k.current_version
WHERE k.id = %(key_id)s AND k.deleted_at IS NULL
FOR UPDATE OF k SKIP LOCKED;

-- name: lock_owner_keys
SELECT id, client_id, ref_hash, current_version, retired_below, false AS deleted, rotation_period_ms, exportable, revision,
       row_mac
FROM keys WHERE client_id = %(client_id)s AND deleted_at IS NULL
ORDER BY id FOR UPDATE;

-- name: deprecate_in_use_version
UPDATE key_versions SET state = 'deprecated' WHERE key_id = %(key_id)s AND state = 'in-use';

-- name: retire_versions_below
UPDATE key_versions SET state = 'retired', wrapped_dek = NULL, kek_version = NULL
WHERE key_id = %(key_id)s AND version < %(below)s AND state <> 'retired'
RETURNING version;

-- name: destroy_key
DELETE FROM keys WHERE id = %(key_id)s RETURNING revision;

-- name: key_exists
SELECT deleted_at IS NOT NULL AS deleted FROM keys WHERE client_id = %(client_id)s AND ref_hash = %(ref_hash)s;

-- name: key_metadata
SELECT k.ref_hash, k.ref_enc, k.current_version, k.rotation_period_ms, k.exportable, k.created_at,
       v.created_at AS rotated_at, k.destroy_after
FROM keys k JOIN key_versions v ON v.key_id = k.id AND v.version = k.current_version
WHERE k.client_id = %(client_id)s AND (%(ref_hash)s::bytea IS NULL OR k.ref_hash = %(ref_hash)s)
ORDER BY k.created_at, k.id;

-- name: key_versions
SELECT v.version, v.state, v.created_at
FROM keys k JOIN key_versions v ON v.key_id = k.id
WHERE k.client_id = %(client_id)s AND k.ref_hash = %(ref_hash)s AND k.deleted_at IS NULL
ORDER BY v.version;

-- name: keys_due_for_rotation
SELECT k.id FROM keys k JOIN key_versions v ON v.key_id = k.id AND v.version = k.current_version
WHERE k.rotation_period_ms IS NOT NULL AND k.deleted_at IS NULL
  AND v.created_at + k.rotation_period_ms * interval '1 millisecond' <= now();

-- name: destroy_due_keys
DELETE FROM keys WHERE id IN (
    SELECT id FROM keys WHERE destroy_after <= now() ORDER BY destroy_after LIMIT 1000
    FOR UPDATE SKIP LOCKED)
RETURNING id, client_id, ref_hash, revision;

-- name: kek_usage
SELECT kek_version, count(*) AS versions FROM key_versions WHERE wrapped_dek IS NOT NULL
GROUP BY kek_version ORDER BY kek_version;

-- name: rewrap_backlog
SELECT count(*) AS versions FROM key_versions WHERE wrapped_dek IS NOT NULL AND kek_version <> %(active)s;

-- name: versions_to_rewrap
-- In (key, version) order from where the last batch ended, so a version that cannot be
-- re-wrapped (it fails authentication) is passed over once, not met again in every batch.
SELECT v.key_id, v.version, v.kek_version, v.wrapped_dek, k.client_id, k.ref_hash
FROM key_versions v JOIN keys k ON k.id = v.key_id
WHERE v.wrapped_dek IS NOT NULL AND v.kek_version <> %(active)s
  AND (v.key_id, v.version) > (%(after_key)s, %(after_version)s)
ORDER BY v.key_id, v.version
LIMIT %(limit)s
FOR UPDATE OF v SKIP LOCKED;

-- name: rewrap_version
UPDATE key_versions SET kek_version = %(kek_version)s, wrapped_dek = %(wrapped_dek)s
WHERE key_id = %(key_id)s AND version = %(version)s;

-- name: keys_backlog
-- For /metrics: the cron's backlog, as keys_due_for_rotation and destroy_due_keys select.
SELECT
    (SELECT count(*) FROM keys k JOIN key_versions v ON v.key_id = k.id AND v.version = k.current_version
     WHERE k.rotation_period_ms IS NOT NULL AND k.deleted_at IS NULL
       AND v.created_at + k.rotation_period_ms * interval '1 millisecond' <= now()) AS rotation_due,
    (SELECT count(*) FROM keys WHERE destroy_after <= now()) AS destruction_due;

-- Keys imported from the original KMS (kms/keys/imported.py).

-- name: import_sources
SELECT id, fingerprint, kek_version, key_ref_secret FROM import_sources ORDER BY id;

-- name: imported_key_exists
SELECT 1 FROM keys WHERE client_id = %(client_id)s AND ref_hash = ANY(%(candidates)s);

-- name: lock_imported_key
-- The caller's imported key, not named yet, with what its MAC covers; a parallel request moving it
-- first leaves nothing to find here once it commits.
SELECT id, client_id, ref_hash, current_version, retired_below, deleted_at IS NOT NULL AS deleted,
       rotation_period_ms, exportable, revision, row_mac
FROM keys
WHERE client_id = %(client_id)s AND ref_hash = ANY(%(candidates)s)
FOR UPDATE;

-- name: key_versions_to_move
SELECT version, kek_version, wrapped_dek FROM key_versions
WHERE key_id = %(key_id)s AND wrapped_dek IS NOT NULL
ORDER BY version
FOR UPDATE;

-- name: move_key_reference
UPDATE keys SET ref_hash = %(ref_hash)s, ref_enc = %(ref_enc)s, revision = %(revision)s, row_mac = %(row_mac)s
WHERE id = %(id)s;

-- name: insert_imported_key_version
INSERT INTO key_versions (key_id, version, state, kek_version, wrapped_dek)
VALUES (%(key_id)s, %(version)s, %(state)s, %(kek_version)s, %(wrapped_dek)s);

-- name: import_sources_to_rewrap
SELECT id, fingerprint, kek_version, key_ref_secret FROM import_sources WHERE kek_version <> %(active)s
FOR UPDATE;

-- name: rewrap_import_source
UPDATE import_sources SET kek_version = %(kek_version)s, key_ref_secret = %(key_ref_secret)s WHERE id = %(id)s;

-- name: import_sources_present
-- Before migration 006 there are none (the step of an earlier migration checks the KEKs too).
SELECT to_regclass('import_sources') IS NOT NULL AS present;

-- name: import_source_kek_versions
SELECT DISTINCT kek_version FROM import_sources;

-- KEK holders (kms/keys/kek_holders.py).

-- name: publish_kek_holder
-- Also forgets processes that died long ago (their rows are ignored from live_until on).
WITH forgotten AS (DELETE FROM kek_holders WHERE live_until < now() - interval '1 day')
INSERT INTO kek_holders (process_id, host, pid, worker_pid, kek_versions, check_values, live_until)
VALUES (%(process_id)s, %(host)s, %(pid)s, %(worker_pid)s, %(kek_versions)s::integer[], %(check_values)s::bytea[],
        now() + %(live_for)s * interval '1 millisecond')
ON CONFLICT (process_id) DO UPDATE
SET kek_versions = EXCLUDED.kek_versions, check_values = EXCLUDED.check_values, live_until = EXCLUDED.live_until;

-- name: forget_kek_holder
DELETE FROM kek_holders WHERE process_id = %(process_id)s;

-- name: live_kek_holders
SELECT host, pid, worker_pid, kek_versions, check_values FROM kek_holders
WHERE live_until > now()
ORDER BY host, pid, worker_pid;

-- name: known_kek_versions
-- Every KEK version some process of this deployment was ever configured with: start-up records
-- each one's check value (secret_checks, under KEK or KEK_<n>).
SELECT CASE WHEN name = 'KEK' THEN 1 ELSE substr(name, 5)::integer END AS kek_version, check_value
FROM secret_checks WHERE name = 'KEK' OR name ~ '^KEK_[0-9]+$';

-- name: use_key
-- The server-side operations' one statement (kms/operations): the token check, the key row with
-- what its MAC covers, the wrapped DEKs of the current version and of the versions named (a
-- batch's ciphertexts may name several), and, when the request was worked out already with DEKs
-- unwrapped earlier (kms.operations.keycache), its audit record. That record is written only if
-- the key row still is what the work assumed: the same key, every version used still served, and
-- for encryption the same current version, not due for rotation. Otherwise nothing is written, the
-- service sees why in the columns and works the request out again from what this read. Columns
-- are named as lookup_key names them, so the same checks read them (kms.keys.service.check_key_read);
-- which versions are served is read off the key row, never off key_versions.state. A grantee's
-- request (`shared`) reads the owner's client row and the caller's live grant as lookup_key does;
-- its record is written only if the grant is the one the work assumed and allows `operation`.
WITH caller AS (
    SELECT s.expires_at, s.epoch, s.revision AS s_revision, s.row_mac AS s_mac, c.id, c.name_hash,
           c.password_hash, c.role, c.revision AS c_revision, c.row_mac AS c_mac
    FROM sessions s JOIN clients c ON c.id = s.client_id
    WHERE s.jti = %(jti)s AND s.client_id = %(client_id)s
      AND s.revoked_at IS NULL AND s.expires_at > now() AND c.status = 'active' AND s.epoch = c.session_epoch
), found AS (
    SELECT caller.expires_at, caller.epoch, caller.s_revision, caller.s_mac, caller.name_hash, caller.password_hash,
           caller.role, caller.c_revision, caller.c_mac, k.id AS key_id, k.current_version, k.retired_below,
           k.rotation_period_ms, k.exportable, k.revision AS k_revision, k.row_mac AS k_mac,
           EXISTS (SELECT 1 FROM key_versions nxt WHERE nxt.key_id = k.id AND nxt.version = k.current_version + 1)
             AS superseded,
           k.rotation_period_ms IS NOT NULL
             AND (SELECT cur.created_at FROM key_versions cur WHERE cur.key_id = k.id AND cur.version = k.current_version)
                 + k.rotation_period_ms * interval '1 millisecond' <= now() AS rotation_due,
           shared.*, shared.g_expires_at <= now() AS grant_expired
    FROM caller
    LEFT JOIN keys k ON k.client_id = %(owner_id)s::uuid AND k.ref_hash = %(ref_hash)s AND k.deleted_at IS NULL
    LEFT JOIN LATERAL (  -- as lookup_key's
        SELECT o.name_hash AS o_name_hash, o.password_hash AS o_password_hash, o.role AS o_role, o.status AS o_status,
               o.session_epoch AS o_epoch, o.revision AS o_revision, o.row_mac AS o_mac, g.id AS grant_id,
               g.operations AS g_operations, g.expires_at AS g_expires_at, g.context_subset AS g_context,
               g.revision AS g_revision, g.row_mac AS g_mac
        FROM clients o
        LEFT JOIN grants g ON g.key_id = k.id AND g.grantee_id = caller.id AND g.revoked_at IS NULL
        WHERE %(shared)s::boolean AND o.id = %(owner_id)s::uuid AND o.name_hash = %(owner_name_hash)s::bytea
    ) shared ON true
), audited AS (
    INSERT INTO audit_events (event_id, at, actor, action, target, version, outcome, request_id, source_ip, detail,
                              row_mac)
    SELECT %(event_id)s::uuid, %(at)s::timestamptz, %(actor)s::text, %(action)s::text, encode(%(ref_hash)s, 'hex'),
           %(version)s::integer, %(outcome)s::text, %(request_id)s::uuid, %(source_ip)s::text, %(detail)s::text,
           %(row_mac)s::bytea
    FROM found
    WHERE %(audit)s::boolean AND found.key_id = %(expect_key_id)s::bigint AND NOT found.superseded
      AND found.retired_below <= %(lowest_version)s::integer AND found.current_version >= %(highest_version)s::integer
      AND (%(expect_current)s::integer IS NULL
           OR (found.current_version = %(expect_current)s::integer AND found.rotation_due IS NOT TRUE))
      AND (NOT %(shared)s::boolean
           OR (found.grant_id = %(grant_id)s::uuid AND found.o_status = 'active'
               AND %(operation)s::text = ANY(found.g_operations) AND found.grant_expired IS NOT TRUE))
)
SELECT found.expires_at::text AS session_expires_at, found.epoch AS session_epoch,
       found.s_revision AS session_revision, found.s_mac AS session_row_mac, found.name_hash AS client_name_hash,
       found.password_hash AS client_password_hash, found.role AS client_role, found.c_revision AS client_revision,
       found.c_mac AS client_row_mac, found.key_id, found.current_version AS key_current_version,
       found.retired_below AS key_retired_below, found.rotation_period_ms AS key_rotation_period_ms,
       found.exportable AS key_exportable, found.k_revision AS key_revision, found.k_mac AS key_row_mac, found.superseded, found.rotation_due,
       served.versions, served.kek_versions, served.wrapped_deks, found.o_name_hash, found.o_password_hash,
       found.o_role, found.o_status, found.o_epoch, found.o_revision, found.o_mac, found.grant_id, found.g_operations,
       found.g_expires_at, found.g_context, found.g_revision, found.g_mac, found.grant_expired
FROM found
LEFT JOIN LATERAL (
    SELECT array_agg(v.version ORDER BY v.version) AS versions, array_agg(v.kek_version ORDER BY v.version) AS kek_versions,
           array_agg(v.wrapped_dek ORDER BY v.version) AS wrapped_deks
    FROM key_versions v
    WHERE %(read_deks)s::boolean AND v.key_id = found.key_id
      AND (v.version = found.current_version OR v.version = ANY(%(versions)s::integer[]))
      AND v.wrapped_dek IS NOT NULL
) served ON true;
