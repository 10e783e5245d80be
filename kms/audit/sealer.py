"""Background sealing of the audit chain, in the server process, on a connection of its own."""
import logging
import threading

from kms import db
from kms.audit.service import (ChainTampered, flush_refusals, read_head_file, record_alone, seal_pending,
                               write_head_file)
from kms.context import Context
from kms.observability.logs import OncePer, log_failure

log = logging.getLogger("kms.audit")


class Sealer(threading.Thread):
    """Seals every AUDIT_SEAL_INTERVAL. After each seal the chain's head (position and MAC) goes to
    the log and to /metrics, so that it is recorded outside the database: `audit verify --head`
    checks the chain against such a record. The head this process last saw is remembered, and a
    chain that no longer contains it is not built upon."""

    def __init__(self, kms):
        super().__init__(name="audit-sealer", daemon=True)
        self.kms = kms
        self.interval = kms.settings.audit_seal_interval_ms / 1000
        self.stopping = threading.Event()
        # A head recorded outside the database survives a restart: a chain re-written meanwhile
        # does not contain it, and is not built upon.
        self.head = read_head_file(kms.settings.audit_head_file)
        self.tampered = False
        self.failures = OncePer()

    def run(self):
        conn = None
        while not self.stopping.wait(self.interval):
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.kms.settings.database_url, application_name="kms-audit-sealer")
                self.seal_once(conn)
            except Exception as error:  # noqa: BLE001 - keep sealing after an outage
                log_failure(log, logging.WARNING, "audit sealing failed; will retry", error, self.failures)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def seal_once(self, conn):
        metrics = self.kms.metrics
        flush_refusals(Context(kms=self.kms, conn=conn))
        try:
            sealed, head = seal_pending(conn, self.kms.audit_key, known=self.head)
        except ChainTampered as tampered:
            metrics.audit_chain_tampered.set(1)
            if not self.tampered:  # once, not every interval
                self.tampered = True
                log.error("audit chain tampered with; sealing stopped",
                          extra={"problem": tampered.problem, "seq": tampered.seq})
                record_alone(Context(kms=self.kms, conn=conn), "audit.tamper", "detected",
                             target=None if tampered.seq is None else str(tampered.seq), actor="kms")
            return
        if head is not None and head != self.head:
            self.head = head
            metrics.publish_audit_head(head.position, head.mac.hex())
            if self.kms.settings.audit_head_file:
                write_head_file(self.kms.settings.audit_head_file, head)
            log.info("audit chain head", extra={"position": head.position, "mac": head.mac.hex(), "sealed": sealed})

    def stop(self):
        self.stopping.set()


def start_sealer(kms) -> Sealer | None:
    if kms.settings.audit_seal_interval_ms <= 0:
        return None
    sealer = Sealer(kms)
    sealer.start()
    return sealer
