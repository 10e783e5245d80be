-- name: insert_audit_event
INSERT INTO audit_events (event_id, at, actor, action, target, version, outcome, request_id, source_ip, row_mac)
VALUES (%(event_id)s, %(at)s, %(actor)s, %(action)s, %(target)s, %(version)s, %(outcome)s,
        %(request_id)s, %(source_ip)s, %(row_mac)s);

-- name: audit_events_after
SELECT seq, at, actor, action, target, version, outcome, request_id, source_ip
FROM audit_events WHERE seq > %(after)s ORDER BY seq LIMIT %(limit)s;

-- name: try_lock_audit_sealer
SELECT pg_try_advisory_xact_lock(7100002);

-- name: lock_audit_sealer
SELECT pg_advisory_xact_lock(7100002);

-- name: audit_chain_head
SELECT chain_pos, chain_hash FROM audit_events
WHERE chain_pos IS NOT NULL ORDER BY chain_pos DESC LIMIT 1;

-- name: unsealed_audit_events
-- Chaining needs only each row's MAC, which covers the rest of the row.
SELECT seq, row_mac FROM audit_events WHERE chain_pos IS NULL ORDER BY seq LIMIT %(limit)s;

-- name: seal_audit_events
-- A whole batch in one statement: the i-th seq gets the i-th chain position and hash.
UPDATE audit_events e SET chain_pos = batch.chain_pos, chain_hash = batch.chain_hash
FROM unnest(%(seqs)s::bigint[], %(positions)s::bigint[], %(hashes)s::bytea[]) AS batch (seq, chain_pos, chain_hash)
WHERE e.seq = batch.seq;

-- name: sealed_audit_chain
SELECT seq, event_id, at, actor, action, target, version, outcome, request_id, source_ip, row_mac,
       chain_pos, chain_hash
FROM audit_events WHERE chain_pos > %(after_pos)s ORDER BY chain_pos LIMIT %(limit)s;

-- name: relax_commit_durability
SET LOCAL synchronous_commit TO off;

-- name: audit_export_page
SELECT seq, at, actor, action, target, version, outcome, request_id, source_ip, chain_pos, chain_hash
FROM audit_events WHERE seq > %(after)s ORDER BY seq LIMIT %(limit)s;
