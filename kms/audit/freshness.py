"""Freshness: every process learns which revision of each row is the newest, from the audit trail.

A change of a MAC'd row past its first revision is named, with the new revision, by the audit
event of the transaction that made it (kms.rows, kms.audit.service.record). The process that made
it knows at once; every other process reads those events here (their MACs checked), at start and
then every AUDIT_SEAL_INTERVAL, by transaction id as the sealer reads: each range of transactions
once, and only when every transaction in it has ended. A row read afterwards with a lower revision
is an older copy put back, and refused (kms.rows.MacdTable.check).

What is found here is also compared with the rows as stored (`stale_rows`): the sealer does it
for the changes it learns each interval, so a row put back before anyone reads it is reported
within an interval; `kms audit verify` does it for every change in the chain.
"""
import logging
import threading

from kms import db
from kms.audit.service import row_mac
from kms.rows import TABLES, parse_changes

log = logging.getLogger("kms.audit")

_TABLE_NAMES = {table.name for table in TABLES}


def catch_up(kms, conn) -> dict[tuple[str, str], int]:
    """Learn the row changes of transactions ended since the last call: {(table, id): revision}."""
    revisions = kms.revisions
    with db.transaction(conn) as cur:
        cur.execute(db.sql.audit_seal_horizon)
        horizon = cur.fetchone().horizon
        cur.execute(db.sql.row_changes_between, {"since": revisions.followed_to, "horizon": horizon})
        events = cur.fetchall()
    learned: dict[tuple[str, str], int] = {}
    for event in events:
        if row_mac(kms.audit_key, event._asdict()) != bytes(event.row_mac):
            # Not written by the KMS: nothing it says is learned (`audit verify` names the row).
            log.error("audit event failed its integrity check; its row changes are not believed",
                      extra={"seq": event.seq})
            kms.metrics.integrity_failures.labels("audit_events").inc()
            continue
        for table, row_id, revision in parse_changes(event.changes):
            if table in _TABLE_NAMES:
                revisions.learn(table, row_id, revision, event.event_id)
                key = (table, row_id)
                learned[key] = max(revision, learned.get(key, 0))
    revisions.followed_to = horizon
    return learned


class ChangeFollower(threading.Thread):
    """In each serving process: catch_up every interval, so a change made by another process is
    known here within an interval of its commit."""

    def __init__(self, kms, connect):
        super().__init__(name="change-follower", daemon=True)
        self.kms = kms
        self.connect = connect  # () -> a context manager giving a connection
        self.interval = (kms.settings.audit_seal_interval_ms or 2000) / 1000
        self.stopping = threading.Event()
        self._failing = False

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                with self.connect() as conn:
                    catch_up(self.kms, conn)
                    self._watch_backlog(conn)
                self._failing = False
            except Exception as error:  # noqa: BLE001 - keep following after an outage
                if not self._failing:  # once per outage, not every interval
                    log.warning("could not read other processes' row changes; will retry",
                                extra={"error_code": type(error).__name__})
                self._failing = True

    def _watch_backlog(self, conn):
        limit_ms = self.kms.settings.audit_fail_closed_after_ms
        if not limit_ms:
            return
        with db.transaction(conn) as cur:
            cur.execute(db.sql.oldest_unsealed_event)
            oldest = cur.fetchone()
        behind = oldest is not None and oldest.age_seconds * 1000 > limit_ms
        if behind != self.kms.audit_behind:
            (log.error if behind else log.warning)(
                "audit sealing is behind AUDIT_FAIL_CLOSED_AFTER: audited work refused" if behind
                else "audit sealing caught up: audited work accepted again",
                extra={"oldestUnsealedSeconds": round(oldest.age_seconds, 1) if oldest else 0})
        self.kms.audit_behind = behind

    def stop(self):
        self.stopping.set()
