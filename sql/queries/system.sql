-- name: remember_secret_check
INSERT INTO secret_checks (name, check_value) VALUES (%(name)s, %(check_value)s)
ON CONFLICT (name) DO NOTHING;

-- name: secret_checks
SELECT name, check_value FROM secret_checks;

-- name: kek_versions_in_use
SELECT DISTINCT kek_version FROM key_versions WHERE wrapped_dek IS NOT NULL;

-- name: bounded_statement_time
-- A read for /metrics never holds a scrape long.
SET LOCAL statement_timeout = 2000;
