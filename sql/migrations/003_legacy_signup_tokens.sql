-- Signup tokens minted offline by the original KMS's admin tool are self-contained (HMAC-signed);
-- the keyed hash of each one used is kept until it expires, so it works once.
CREATE TABLE legacy_signup_tokens_used (
    token_hash bytea PRIMARY KEY,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz NOT NULL DEFAULT now()
);
