-- Clients are service accounts. Their names are found by HMAC (name_hash) and kept encrypted
-- (name_enc, bound to the row's id); role and status are trusted only from this row.
CREATE TABLE clients (
    id            uuid PRIMARY KEY,
    name_hash     bytea UNIQUE,               -- NULL once deleted, so the name can be used again
    name_enc      bytea NOT NULL,
    password_hash text NOT NULL,              -- Argon2id PHC string
    role          text NOT NULL CHECK (role IN ('client', 'admin')),
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled', 'deleted')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz,
    CHECK ((status = 'deleted') = (name_hash IS NULL))
);

-- One row per issued JWT: the token works only while its row is live and its client active.
CREATE TABLE sessions (
    jti        uuid PRIMARY KEY,
    client_id  uuid NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX sessions_live_by_client ON sessions (client_id) WHERE revoked_at IS NULL;
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

-- Signup tokens are random; only their HMAC (SIGNUP_SECRET) is stored, and the row makes each
-- one usable once, for the one client name it was issued for.
CREATE TABLE signup_tokens (
    id         uuid PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE,
    name_hash  bytea NOT NULL,
    name_enc   bytea NOT NULL,
    role       text NOT NULL CHECK (role IN ('client', 'admin')),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    issued_by  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Failed logins, counted per client name hash and per source address over a sliding window.
CREATE TABLE login_failures (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope     text NOT NULL CHECK (scope IN ('client', 'address')),
    subject   text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_window ON login_failures (scope, subject, failed_at);

-- A key belongs to one client and is found by HMAC of (client, reference); the reference itself
-- is kept only encrypted, so owners can list their keys.
CREATE TABLE keys (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id          uuid NOT NULL REFERENCES clients (id),
    ref_hash           bytea NOT NULL,
    ref_enc            bytea NOT NULL,
    current_version    integer NOT NULL DEFAULT 1,
    rotation_period_ms bigint CHECK (rotation_period_ms > 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    deleted_at         timestamptz,
    destroy_after      timestamptz,
    UNIQUE (client_id, ref_hash),
    CHECK ((deleted_at IS NULL) = (destroy_after IS NULL))
);
CREATE INDEX keys_destroy_due ON keys (destroy_after) WHERE destroy_after IS NOT NULL;
CREATE INDEX keys_with_rotation_period ON keys (id) WHERE rotation_period_ms IS NOT NULL;

-- Each version's DEK, wrapped under a KEK with AES-GCM bound to owner, reference, version and KEK
-- version. Retired versions keep their row but lose their material.
CREATE TABLE key_versions (
    key_id      bigint NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
    version     integer NOT NULL CHECK (version >= 1),
    state       text NOT NULL CHECK (state IN ('in-use', 'deprecated', 'retired')),
    kek_version integer,
    wrapped_dek bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, version),
    CHECK ((state = 'retired') = (wrapped_dek IS NULL)),
    CHECK ((wrapped_dek IS NULL) = (kek_version IS NULL))
);
CREATE UNIQUE INDEX key_versions_one_in_use ON key_versions (key_id) WHERE state = 'in-use';
CREATE INDEX key_versions_by_kek ON key_versions (kek_version) WHERE wrapped_dek IS NOT NULL;

-- Fingerprints of the configured secrets, so start-up refuses a KEK or DB_SECRET that differs
-- from the one the stored data was written with.
CREATE TABLE secret_checks (
    name        text PRIMARY KEY,
    check_value bytea NOT NULL
);

-- The audit trail. row_mac is computed when the event is written; chain_pos/chain_hash when it is
-- sealed into the chain (one sealer at a time), so appends never wait on a global lock.
CREATE TABLE audit_events (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   uuid NOT NULL,                   -- random, covered by row_mac
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    target     text,
    version    integer,
    outcome    text NOT NULL,
    request_id uuid,
    source_ip  text,
    row_mac    bytea NOT NULL,
    chain_pos  bigint,
    chain_hash bytea,
    CHECK ((chain_pos IS NULL) = (chain_hash IS NULL))
);
-- Partial indexes: an append touches only the primary key and the small "unsealed" index.
CREATE UNIQUE INDEX audit_events_chain ON audit_events (chain_pos) WHERE chain_pos IS NOT NULL;
CREATE INDEX audit_events_unsealed ON audit_events (seq) WHERE chain_pos IS NULL;
