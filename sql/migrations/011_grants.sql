-- Grants: a key's owner lets another client (the grantee) use that key for named operations
-- (kms/grants). A grant row grants authority, so it is under a row MAC and a revision like every
-- such row (kms.rows.GRANTS): a row invented, widened, re-pointed to another key or grantee, or put
-- back after its revocation by a database writer is refused on use and reported.
-- `operations` is the sorted list of operation names; `context_subset` canonical JSON text (sorted
-- keys, no spaces) or NULL for none. A grant is revoked, never deleted while its key lives; one live
-- grant per grantee and key (a change is a revocation and a new grant).
CREATE TABLE grants (
    id             uuid PRIMARY KEY,
    key_id         bigint NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
    grantee_id     uuid NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    operations     text[] NOT NULL CHECK (cardinality(operations) BETWEEN 1 AND 5),
    expires_at     timestamptz,
    context_subset text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revision       integer NOT NULL DEFAULT 1 CHECK (revision >= 1),
    row_mac        bytea NOT NULL
);
-- A grantee's use finds its grant by both columns; a grantee's listing by the first; a key's
-- listing, and the cascade of its destruction, by the key.
CREATE UNIQUE INDEX grants_live_per_grantee ON grants (grantee_id, key_id) WHERE revoked_at IS NULL;
CREATE INDEX grants_by_key ON grants (key_id);

-- The use of a grant is recorded on each operation's audit event (`detail`: {"grant": id, ...});
-- a key's owner reads a grant's uses through this index.
CREATE INDEX audit_events_by_grant ON audit_events (((detail::jsonb) ->> 'grant'), seq)
    WHERE detail LIKE '%"grant":%';
