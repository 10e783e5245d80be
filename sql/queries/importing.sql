-- `kms import-seed` (kms/importing). The first queries read the original Go KMS's database, only
-- ever in a read-only transaction; its schema is its database/migrations/00001_init_mg.up.sql,
-- whose unquoted names PostgreSQL folds to lower case (clientId is clientid).

-- name: original_schema
-- The original's two tables with every column it reads (our own database has tables of these
-- names too, with other columns: a wrong --from is refused here).
SELECT count(*) = 12 AS present
FROM information_schema.columns
WHERE table_schema = current_schema()
  AND (table_name, column_name) IN (('clients', 'id'), ('clients', 'clientname'), ('clients', 'hashedclientname'),
                                    ('clients', 'password'), ('clients', 'role'), ('keys', 'id'),
                                    ('keys', 'clientid'), ('keys', 'keyreference'), ('keys', 'version'),
                                    ('keys', 'dek'), ('keys', 'state'), ('keys', 'encoding'));

-- name: original_clients
SELECT id, clientname, hashedclientname, password, role FROM clients ORDER BY id;

-- name: original_key_counts
SELECT count(DISTINCT (clientid, keyreference)) AS keys, count(*) AS versions FROM keys;

-- name: original_key_rows
-- Every version of one key one after the other, oldest first.
SELECT id, clientid, keyreference, version, dek, state, encoding FROM keys
ORDER BY clientid, keyreference, version;

-- name: original_key_sample
SELECT id, clientid, keyreference, version, dek, state, encoding FROM keys ORDER BY id LIMIT %(limit)s;

-- name: original_key_named
SELECT 1 FROM keys WHERE clientid = %(client_id)s AND keyreference = %(reference_hash)s LIMIT 1;

-- The rest work on our database.

-- name: try_import_lock
-- One import at a time: a second one is refused at once rather than racing the first.
SELECT pg_try_advisory_lock(7100006) AS locked;

-- name: import_unlock
SELECT pg_advisory_unlock(7100006);

-- name: import_source_by_fingerprint
SELECT id, fingerprint, kek_version, key_ref_secret FROM import_sources WHERE fingerprint = %(fingerprint)s;

-- name: insert_import_source
INSERT INTO import_sources (fingerprint, kek_version, key_ref_secret)
VALUES (%(fingerprint)s, %(kek_version)s, %(key_ref_secret)s)
RETURNING id;

-- name: replace_import_source_secret
UPDATE import_sources SET kek_version = %(kek_version)s, key_ref_secret = %(key_ref_secret)s WHERE id = %(id)s;

-- name: imported_clients_of_source
SELECT original_id, client_id FROM imported_clients WHERE source_id = %(source_id)s;

-- name: record_imported_client
INSERT INTO imported_clients (source_id, original_id, client_id) VALUES (%(source_id)s, %(original_id)s, %(client_id)s);

-- name: imported_keys_of_source
SELECT imported_ref_hash, newest_version FROM imported_keys WHERE source_id = %(source_id)s;

-- name: record_imported_key
INSERT INTO imported_keys (imported_ref_hash, source_id, newest_version, key_id)
VALUES (%(imported_ref_hash)s, %(source_id)s, %(newest_version)s, %(key_id)s);
