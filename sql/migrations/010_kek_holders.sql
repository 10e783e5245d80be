-- Which KEK versions each running server process holds, so that no DEK is wrapped under (or moved
-- to) a KEK version that a live server cannot open (kms/keys/kek_holders.py). Each serving process
-- writes its row when it starts, refreshes it while it runs and removes it when it stops; a row
-- whose `live_until` has passed is a process that died without saying so, and is ignored.
-- check_values[i] is the key check value of kek_versions[i] (a fingerprint: it reveals nothing of
-- the key), so a process holding a different key under the same version does not count as holding it.
CREATE TABLE kek_holders (
    process_id   uuid PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,            -- the `kms serve` process (the one to restart)
    worker_pid   integer NOT NULL,            -- the process that serves (pid, with one worker)
    kek_versions integer[] NOT NULL,
    check_values bytea[] NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    live_until   timestamptz NOT NULL,
    CHECK (cardinality(kek_versions) = cardinality(check_values))
);
