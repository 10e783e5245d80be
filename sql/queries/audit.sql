-- name: insert_audit_event
INSERT INTO audit_events (event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats,
                          changes, detail, row_mac)
VALUES (%(event_id)s, %(at)s, %(actor)s, %(action)s, %(target)s, %(version)s, %(outcome)s,
        %(request_id)s, %(source_ip)s, %(repeats)s, %(changes)s, %(detail)s, %(row_mac)s);

-- name: audit_events_after
SELECT seq, at, actor, action, target, version, outcome, request_id, source_ip, repeats, detail
FROM audit_events WHERE seq > %(after)s ORDER BY seq LIMIT %(limit)s;

-- name: try_lock_audit_sealer
SELECT pg_try_advisory_xact_lock(7100002) AS locked;

-- name: lock_audit_sealer
SELECT pg_advisory_xact_lock(7100002);

-- name: audit_chain_head
-- The chain's last two rows: the head, and the one whose hash the head's must follow from.
SELECT chain_pos, chain_hash, seq, txid::text, row_mac, chain_format FROM audit_events
WHERE chain_pos IS NOT NULL ORDER BY chain_pos DESC LIMIT 2;

-- name: audit_chain_hash_at
SELECT chain_hash FROM audit_events WHERE chain_pos = %(position)s;

-- name: audit_seal_horizon
-- Every transaction below this id has ended: no row of theirs can still appear.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon;

-- name: unsealed_behind_head
-- A row no sealer ever saw, from a transaction older than the chain's head: written out of band,
-- or its chain was taken off it. Such a row is never chained.
SELECT min(seq) AS seq FROM audit_events WHERE chain_pos IS NULL AND txid < %(txid)s::xid8;

-- name: unsealed_audit_events
-- Chaining needs only each row's seq, transaction and MAC (which covers the rest of the row), in
-- the order their transactions began, and only from transactions that have ended.
SELECT seq, txid::text, row_mac FROM audit_events
WHERE chain_pos IS NULL AND txid < %(horizon)s::xid8
ORDER BY audit_events.txid, seq LIMIT %(limit)s;  -- the column, not the text select-list one

-- name: seal_audit_events
-- A whole batch in one statement: the i-th seq gets the i-th chain position and hash.
UPDATE audit_events e SET chain_pos = batch.chain_pos, chain_hash = batch.chain_hash, chain_format = 2
FROM unnest(%(seqs)s::bigint[], %(positions)s::bigint[], %(hashes)s::bytea[]) AS batch (seq, chain_pos, chain_hash)
WHERE e.seq = batch.seq;

-- name: audit_chain_length
SELECT coalesce(max(chain_pos), 0) AS length FROM audit_events;

-- name: sealed_audit_chain
SELECT seq, event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats, changes, detail, row_mac,
       chain_pos, chain_hash, txid::text, chain_format
FROM audit_events WHERE chain_pos > %(after_pos)s ORDER BY chain_pos LIMIT %(limit)s;

-- name: relax_commit_durability
SET LOCAL synchronous_commit TO off;

-- name: audit_export_page
SELECT seq, at, actor, action, target, version, outcome, request_id, source_ip, repeats, detail, chain_pos,
       chain_hash
FROM audit_events WHERE seq > %(after)s ORDER BY seq LIMIT %(limit)s;

-- name: audit_backlog
-- For /metrics: the audit events not yet sealed.
SELECT count(*) AS unsealed, extract(epoch FROM now() - min(at)) AS oldest_seconds
FROM audit_events WHERE chain_pos IS NULL;

-- name: row_changes_between
-- The events that changed rows past their first revision (kms.rows), from transactions that began
-- in [since, horizon) and have all ended: read once each, by every process (kms.audit.freshness).
SELECT seq, event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats, changes, detail, row_mac
FROM audit_events
WHERE changes IS NOT NULL AND txid >= %(since)s::xid8 AND txid < %(horizon)s::xid8
ORDER BY txid, seq;

-- name: clients_revisions
SELECT id::text AS id, revision FROM clients WHERE id::text = ANY(%(ids)s);

-- name: sessions_revisions
SELECT jti::text AS id, revision FROM sessions WHERE jti::text = ANY(%(ids)s);

-- name: signup_tokens_revisions
SELECT id::text AS id, revision FROM signup_tokens WHERE id::text = ANY(%(ids)s);

-- name: keys_revisions
SELECT id::text AS id, revision FROM keys WHERE id::text = ANY(%(ids)s);

-- name: grants_revisions
SELECT id::text AS id, revision FROM grants WHERE id::text = ANY(%(ids)s);

-- name: audit_chain_state_revisions
SELECT 'True' AS id, revision FROM audit_chain_state WHERE 'True' = ANY(%(ids)s);  -- its id as kms.rows names it

-- name: audit_chain_state
SELECT id, chain_id, started, tampered, revision, row_mac FROM audit_chain_state;

-- name: lock_audit_chain_state
SELECT id, chain_id, started, tampered, revision, row_mac FROM audit_chain_state FOR UPDATE;

-- name: write_audit_chain_state
INSERT INTO audit_chain_state (id, chain_id, started, tampered, revision, row_mac)
VALUES (true, %(chain_id)s, %(started)s, %(tampered)s, %(revision)s, %(row_mac)s)
ON CONFLICT (id) DO UPDATE SET chain_id = excluded.chain_id, started = excluded.started,
                               tampered = excluded.tampered, revision = excluded.revision, row_mac = excluded.row_mac;

-- name: audit_events_exist
SELECT EXISTS (SELECT 1 FROM audit_events) AS exist;

-- name: oldest_unsealed_event
-- The oldest event no sealer has chained yet (the partial index's first entry).
SELECT seq, extract(epoch FROM now() - at)::float AS age_seconds FROM audit_events
WHERE chain_pos IS NULL ORDER BY txid, seq LIMIT 1;

-- name: sealing_blockers
-- What can keep the sealer from its work: another session holding its lock (7100002, as
-- try_lock_audit_sealer takes it), and the oldest open transaction or prepared transaction of the
-- cluster (any database), which holds back the horizon the sealer waits for.
SELECT (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = 7100002
          AND objsubid = 1 AND granted AND pid <> pg_backend_pid() LIMIT 1) AS lock_holder,
       o.pid AS oldest_pid, o.datname AS oldest_database,
       extract(epoch FROM now() - o.xact_start)::float AS oldest_age_seconds,
       (SELECT extract(epoch FROM now() - min(prepared))::float FROM pg_prepared_xacts) AS prepared_age_seconds
FROM (SELECT 1) one
LEFT JOIN (SELECT pid, datname, xact_start FROM pg_stat_activity
           WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) AND pid <> pg_backend_pid()
           ORDER BY xact_start LIMIT 1) o ON true;

-- name: unsealed_audit_page
SELECT seq, event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats, changes, detail, row_mac,
       txid::text
FROM audit_events WHERE chain_pos IS NULL AND seq > %(after)s ORDER BY seq LIMIT %(limit)s;

-- name: audit_event_exists
SELECT 1 FROM audit_events WHERE event_id = %(event_id)s;

-- name: sealed_events_after
-- For the audit stream (AUDIT_SINK): sealed events in chain order, with what lets a reader outside
-- the database check them (the row MAC and the chain hash).
SELECT seq, at, actor, action, target, version, outcome, request_id, source_ip, repeats, changes, detail, row_mac,
       chain_pos, chain_hash
FROM audit_events WHERE chain_pos > %(after)s ORDER BY chain_pos LIMIT %(limit)s;
