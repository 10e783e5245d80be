-- name: insert_audit_event
INSERT INTO audit_events (event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats,
                          detail, row_mac)
VALUES (%(event_id)s, %(at)s, %(actor)s, %(action)s, %(target)s, %(version)s, %(outcome)s,
        %(request_id)s, %(source_ip)s, %(repeats)s, %(detail)s, %(row_mac)s);

-- name: count_refusal
-- This refusal's count in its window (per action, outcome and source): 1 means it is the first.
INSERT INTO audit_refusals AS r (action, outcome, source_ip, window_start, count)
VALUES (%(action)s, %(outcome)s, %(source_ip)s,
        to_timestamp(floor(extract(epoch FROM now()) / %(window_s)s) * %(window_s)s), 1)
ON CONFLICT (action, outcome, source_ip, window_start) DO UPDATE SET count = r.count + 1
RETURNING count;

-- name: take_closed_refusal_windows
DELETE FROM audit_refusals
WHERE window_start <= now() - %(window_s)s * interval '1 second' OR %(all)s::boolean
RETURNING action, outcome, source_ip, window_start, count;

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
SELECT seq, event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats, detail, row_mac,
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
