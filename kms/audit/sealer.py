"""Background sealing of the audit chain, in the server process, on a connection of its own."""
import logging
import threading

from kms import db
from kms.audit.service import flush_refusals, seal_pending
from kms.context import Context

log = logging.getLogger("kms.audit")


class Sealer(threading.Thread):
    def __init__(self, kms):
        super().__init__(name="audit-sealer", daemon=True)
        self.kms = kms
        self.interval = kms.settings.audit_seal_interval_ms / 1000
        self.stopping = threading.Event()

    def run(self):
        conn = None
        while not self.stopping.wait(self.interval):
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.kms.settings.database_url, application_name="kms-audit-sealer")
                flush_refusals(Context(kms=self.kms, conn=conn))
                seal_pending(conn, self.kms.audit_key)
            except Exception as error:  # noqa: BLE001 - keep sealing after an outage
                log.warning("audit sealing failed; will retry", extra={"error_code": type(error).__name__})
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop(self):
        self.stopping.set()


def start_sealer(kms) -> Sealer | None:
    if kms.settings.audit_seal_interval_ms <= 0:
        return None
    sealer = Sealer(kms)
    sealer.start()
    return sealer
