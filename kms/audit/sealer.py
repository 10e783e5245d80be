"""Background sealing of the audit chain, in the server process (or a process of its own beside
the workers), on a connection of its own."""
import logging
import threading

from kms import db
from kms.audit.chainstate import (ChainTampered, HeadFile, HeadFileOfAnotherChain, HeadFileUnreadable, chain_id_of,
                                  read_head_file, read_state, write_head_file, write_state)
from kms.audit.freshness import catch_up
from kms.audit.service import flush_refusals, record, record_alone, seal_pending
from kms.audit.sink import open_sink, ship
from kms.context import Context
from kms.rows import stale_rows
from kms.failures import OncePer, log_failure

log = logging.getLogger("kms.audit")

STALLED_AFTER_INTERVALS = 5  # sealing is "stalled" once the oldest unsealed event is this many intervals old


class Sealer(threading.Thread):
    """Seals every AUDIT_SEAL_INTERVAL. After each seal the chain's head (position and MAC) goes to
    the log, to /metrics and to AUDIT_HEAD_FILE, so that it is recorded outside the database; a
    chain that no longer contains the newest head recorded is not built upon.

    Each interval it also: compares the rows whose changes it learned with the rows as stored (an
    older copy put back before anyone read it is reported within an interval), and watches that
    sealing keeps up, naming what blocks it when it does not (a held lock, an old transaction)."""

    def __init__(self, kms):
        super().__init__(name="audit-sealer", daemon=True)
        self.kms = kms
        self.interval = kms.settings.audit_seal_interval_ms / 1000
        self.stalled_after = max(STALLED_AFTER_INTERVALS * self.interval, 10.0)
        self.stopping = threading.Event()
        self.head = None
        self.tampered: str | None = None  # the problem found, once flagged in this process
        self._failing: str | None = None
        self.chain_id: str | None = None
        self.sink = open_sink(kms.settings.audit_sink, kms.settings.audit_head_file)
        self._sink_failing: str | None = None
        self.failures = OncePer()

    def run(self):
        conn = None
        while not self.stopping.wait(self.interval):
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.kms.settings.database_url, application_name="kms-audit-sealer")
                self.seal_once(conn)
                self._failing = None
            except Exception as error:  # noqa: BLE001 - keep sealing after an outage
                log_failure(log, logging.WARNING, "audit sealing failed; will retry", error, self.failures)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
        self.close()

    def _head_file(self) -> HeadFile:
        try:
            return read_head_file(self.kms.settings.audit_head_file)
        except HeadFileUnreadable as unreadable:
            return HeadFile(None, str(unreadable))

    def seal_once(self, conn):
        metrics = self.kms.metrics
        recorded = self._head_file()
        if recorded.tampered:
            self._flag(conn, ChainTampered(recorded.tampered), recorded)
            return
        if self.tampered:  # acknowledged since (`kms audit acknowledge` cleared the head file)
            log.warning("audit chain tampering acknowledged; sealing resumes", extra={"head": str(recorded.head)})
            self.tampered, self.head = None, None
        ctx = Context(kms=self.kms, conn=conn)
        flush_refusals(ctx)
        self._report_stale(conn, catch_up(self.kms, conn))
        known = max((head for head in (self.head, recorded.head) if head is not None),
                    key=lambda head: head.position, default=None)
        try:
            self.chain_id = self.chain_id or chain_id_of(conn, self.kms)
            sealed, head = seal_pending(conn, self.kms, known=known, chain_id=recorded.chain_id)
        except ChainTampered as tampered:
            self._flag(conn, tampered, recorded)
            return
        except HeadFileOfAnotherChain as foreign:
            if self._failing != "foreign":  # a mistake of configuration: said once, nothing written
                log.error("audit sealing stopped", extra={"problem": str(foreign)})
            self._failing = "foreign"
            return
        metrics.audit_chain_tampered.set(0)
        if head is not None and head != self.head:
            self.head = head
            metrics.publish_audit_head(head.position, head.mac.hex())
            if self.kms.settings.audit_head_file:
                write_head_file(self.kms.settings.audit_head_file, HeadFile(head, chain_id=self.chain_id))
            log.info("audit chain head", extra={"position": head.position, "mac": head.mac.hex(), "sealed": sealed})
        self._ship(conn)
        self._watch_progress(conn)

    def _ship(self, conn):
        """AUDIT_SINK: what was sealed, streamed; a sink that fails is tried again next interval."""
        if self.sink is None:
            return
        try:
            ship(self.sink, conn)
            self._sink_failing = None
        except OSError as error:
            if self._sink_failing != type(error).__name__:
                log.warning("audit stream failed; will retry", extra={"error_code": type(error).__name__,
                                                                      "problem": error.strerror or str(error)})
            self._sink_failing = type(error).__name__

    def _report_stale(self, conn, learned: dict):
        if not learned:
            return
        with db.transaction(conn) as cur:
            stale = stale_rows(cur, learned)
        for table, row_id, stored, newest in stale:
            log.error("stored row is an older copy of itself (put back); not obeyed",
                      extra={"table": table, "rowId": row_id, "revision": stored, "newestRevision": newest})
            self.kms.metrics.integrity_failures.labels(table).inc()
            record_alone(Context(kms=self.kms, conn=conn), "integrity.failure", "rolled_back",
                         target=f"{table}:{row_id}", actor="kms")

    def _flag(self, conn, tampered: ChainTampered, recorded: HeadFile):
        """Stop sealing and say so, once; keep the flag in the database and in the head file, so
        that it outlives a restart until an operator acknowledges it."""
        self.kms.metrics.audit_chain_tampered.set(1)
        if self.tampered is not None:
            return
        self.tampered = tampered.problem
        log.error("audit chain tampered with; sealing stopped until `kms audit acknowledge`",
                  extra={"problem": tampered.problem, "seq": tampered.seq})
        ctx = Context(kms=self.kms, conn=conn)
        with db.transaction(conn) as cur:
            try:
                state = read_state(cur, self.kms)
                if not state.tampered:
                    write_state(cur, self.kms, state, tampered=tampered.problem)
            except ChainTampered:
                pass  # the state row itself is what was tampered with: the head file keeps the flag
            record(cur, ctx, "audit.tamper", "detected", target=None if tampered.seq is None else str(tampered.seq),
                   actor="kms")
        if self.kms.settings.audit_head_file and not recorded.tampered:
            write_head_file(self.kms.settings.audit_head_file,
                            HeadFile(recorded.head or self.head, tampered.problem, recorded.chain_id or self.chain_id))

    def _watch_progress(self, conn):
        """Sealing that does not keep up (its lock held elsewhere, or an old transaction holding
        back the horizon it waits for) is logged every interval with what blocks it."""
        with db.transaction(conn) as cur:
            cur.execute(db.sql.oldest_unsealed_event)
            oldest = cur.fetchone()
            age = oldest.age_seconds if oldest else 0.0
            self.kms.metrics.audit_sealing_stalled.set(1 if age > self.stalled_after else 0)
            if age <= self.stalled_after:
                return
            cur.execute(db.sql.sealing_blockers)
            blockers = cur.fetchone()
        log.warning("audit sealing stalled", extra={
            "oldestUnsealedSeconds": round(age, 1), "oldestUnsealedSeq": oldest.seq,
            "lockHolderPid": blockers.lock_holder, "oldestTransactionPid": blockers.oldest_pid,
            "oldestTransactionDatabase": blockers.oldest_database,
            "oldestTransactionSeconds": None if blockers.oldest_age_seconds is None
            else round(blockers.oldest_age_seconds, 1),
            "oldestPreparedTransactionSeconds": blockers.prepared_age_seconds})

    def stop(self):
        self.stopping.set()

    def close(self):
        if self.sink is not None:
            self.sink.close()


def start_sealer(kms) -> Sealer | None:
    if kms.settings.audit_seal_interval_ms <= 0:
        return None
    sealer = Sealer(kms)
    sealer.start()
    return sealer
