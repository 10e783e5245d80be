-- Deployments of the original Go KMS moved here with `kms import-seed` (kms/importing), and what
-- came from each, so that a second run imports nothing twice.

-- The original kept only an HMAC of each key reference, under its own KEY_REF_SECRET. An imported
-- key is found by a keyed hash of that HMAC until its owner first names it (kms/keys/imported.py),
-- so the original's KEY_REF_SECRET is kept here, wrapped under our KEK (AES-256-GCM, bound to the
-- row's fingerprint and KEK version): the one secret of the original this KMS keeps.
CREATE TABLE import_sources (
    id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fingerprint    bytea NOT NULL UNIQUE,   -- keyed hash of the original's USERNAME_SECRET: which deployment
    kek_version    integer NOT NULL,
    key_ref_secret bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Each imported client and key, by its identity in the source. The record outlives what it points
-- at (deleted here later), so that a second run does not bring it back.
CREATE TABLE imported_clients (
    source_id   integer NOT NULL REFERENCES import_sources (id),
    original_id integer NOT NULL,           -- the original's clients.id
    client_id   uuid REFERENCES clients (id) ON DELETE SET NULL,
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_id, original_id)
);
CREATE TABLE imported_keys (
    imported_ref_hash bytea PRIMARY KEY,    -- the key's ref_hash as imported (owner and the original's HMAC)
    source_id         integer NOT NULL REFERENCES import_sources (id),
    newest_version    integer NOT NULL,     -- the source's newest version when it was imported
    key_id            bigint REFERENCES keys (id) ON DELETE SET NULL,
    imported_at       timestamptz NOT NULL DEFAULT now()
);

-- An imported key nobody has named yet has no reference to keep: listings show it without one.
ALTER TABLE keys ALTER COLUMN ref_enc DROP NOT NULL;

-- Imported clients keep the original's bcrypt hash until their first login replaces it. While any
-- is left, every login does the work of both kinds of check (kms/auth/passwords.py); this index
-- makes asking whether any is left cost next to nothing.
CREATE INDEX clients_with_imported_password ON clients (id) WHERE starts_with(password_hash, '$2');
