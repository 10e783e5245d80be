-- Grants (kms/grants): every row read to be obeyed comes with what its MAC covers (kms.rows.GRANTS);
-- `operations` is text[] here and its words joined by spaces under the MAC.

-- name: insert_grant
-- One live grant per grantee and key (grants_live_per_grantee): nothing comes back when there is one.
INSERT INTO grants (id, key_id, grantee_id, operations, expires_at, context_subset, revision, row_mac)
VALUES (%(id)s, %(key_id)s, %(grantee_id)s, %(operations)s, %(expires_at)s, %(context_subset)s, 1, %(row_mac)s)
ON CONFLICT (grantee_id, key_id) WHERE revoked_at IS NULL DO NOTHING
RETURNING created_at;

-- name: key_grants
-- The live grants on a key (not past their expiry, ended or not), with their grantees' names (encrypted: kms.crypto.Keyring.decrypt_field).
SELECT g.id, g.key_id, g.grantee_id, g.operations, g.expires_at, g.context_subset, false AS revoked, g.revision,
       g.row_mac, g.created_at, c.name_enc AS grantee_name_enc
FROM grants g JOIN clients c ON c.id = g.grantee_id
WHERE g.key_id = %(key_id)s AND g.revoked_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > now())
ORDER BY g.created_at, g.id;

-- name: client_grants
-- The live grants made to a client (`to_client`) or on its keys (`by_client`), not past their
-- expiry, on keys not deleted,
-- with each key's owner and reference (encrypted); either parameter may be NULL.
SELECT g.id, g.key_id, g.grantee_id, g.operations, g.expires_at, g.context_subset, false AS revoked, g.revision,
       g.row_mac, g.created_at, k.client_id AS owner_id, k.ref_hash, k.ref_enc, o.name_enc AS owner_name_enc,
       c.name_enc AS grantee_name_enc
FROM grants g JOIN keys k ON k.id = g.key_id JOIN clients o ON o.id = k.client_id
JOIN clients c ON c.id = g.grantee_id
WHERE g.revoked_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > now()) AND k.deleted_at IS NULL
  AND (g.grantee_id = %(to_client)s OR k.client_id = %(by_client)s)
ORDER BY g.created_at, g.id;

-- name: lock_grant
-- A live grant with its key's owner and hashed reference, locked for its revocation.
SELECT g.id, g.key_id, g.grantee_id, g.operations, g.expires_at, g.context_subset, false AS revoked, g.revision,
       g.row_mac, k.client_id AS owner_id, k.ref_hash
FROM grants g JOIN keys k ON k.id = g.key_id
WHERE g.id = %(grant_id)s AND g.revoked_at IS NULL
FOR UPDATE OF g;

-- name: lock_client_grants
-- The live grants made to a client or on its keys, locked (its deletion revokes them), with each
-- key's hashed reference (the audit event of each end names it).
SELECT g.id, g.key_id, g.grantee_id, g.operations, g.expires_at, g.context_subset, false AS revoked, g.revision,
       g.row_mac, k.ref_hash
FROM grants g JOIN keys k ON k.id = g.key_id
WHERE g.revoked_at IS NULL AND (g.grantee_id = %(client_id)s OR k.client_id = %(client_id)s)
ORDER BY g.id FOR UPDATE OF g;

-- name: lock_expired_grants
-- Live grants past their expiry (the cron job records their end), a batch at a time.
SELECT g.id, g.key_id, g.grantee_id, g.operations, g.expires_at, g.context_subset, false AS revoked, g.revision,
       g.row_mac, k.ref_hash
FROM grants g JOIN keys k ON k.id = g.key_id
WHERE g.revoked_at IS NULL AND g.expires_at <= now()
ORDER BY g.id LIMIT 1000 FOR UPDATE OF g SKIP LOCKED;

-- name: lock_expired_grant
-- The grantee's grant on a key that is past its expiry but not ended yet, locked: a new grant ends it.
SELECT g.id, g.key_id, g.grantee_id, g.operations, g.expires_at, g.context_subset, false AS revoked, g.revision,
       g.row_mac
FROM grants g
WHERE g.key_id = %(key_id)s AND g.grantee_id = %(grantee_id)s AND g.revoked_at IS NULL AND g.expires_at <= now()
FOR UPDATE;

-- name: revoke_grant
UPDATE grants SET revoked_at = now(), revision = %(revision)s, row_mac = %(row_mac)s
WHERE id = %(id)s AND revoked_at IS NULL;

-- name: grant_uses
-- The audit events that name a grant (its creation, each use, its end), oldest first.
SELECT seq, at, actor, action, target, version, outcome, request_id, source_ip, repeats, detail
FROM audit_events
WHERE detail LIKE '%%"grant":%%' AND ((detail::jsonb) ->> 'grant') = %(grant_id)s AND seq > %(after)s
ORDER BY ((detail::jsonb) ->> 'grant'), seq LIMIT %(limit)s;

-- name: grant_on_key
-- Whether a grant (live or ended) was made on a key: its uses are the key owner's to read.
SELECT 1 AS found FROM grants WHERE id = %(grant_id)s AND key_id = %(key_id)s;
