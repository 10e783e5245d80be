-- Refusals from anonymous callers (bad signup tokens, throttled logins) are counted here per
-- action, outcome, source address and minute, instead of writing one audit row each: the first
-- of a window is an audit event at once, the rest become one event with a count when the window
-- closes. An attack is recorded without being able to fill the disk.
CREATE TABLE audit_refusals (
    action       text NOT NULL,
    outcome      text NOT NULL,
    source_ip    text NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer NOT NULL,
    PRIMARY KEY (action, outcome, source_ip, window_start)
);

-- How many more times than once an event happened (NULL: once); covered by the row's MAC.
ALTER TABLE audit_events ADD COLUMN repeats integer CHECK (repeats > 0);
