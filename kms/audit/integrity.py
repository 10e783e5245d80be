"""Telling the operator that a stored row failed its integrity check (kms.rows): the row is not
obeyed, and this is how anyone finds out."""
import logging

from flask import has_request_context

from kms.audit.service import record_alone
from kms.failures import OncePer, log_failure
from kms.web.routing import context

log = logging.getLogger("kms.errors")
_FAILURES = OncePer()


def report_integrity_failure(table: str, row_id: str, *, rolled_back: bool = False):
    """A log line (no secrets: a table and a row id) and, within a request, a metric and an
    audit event in a transaction of its own."""
    if rolled_back:
        log.error("stored row is an older copy of itself (put back); not obeyed",
                  extra={"table": table, "rowId": row_id})
    else:
        log.error("stored row failed its integrity check; not obeyed", extra={"table": table, "rowId": row_id})
    if not has_request_context():
        return
    try:
        ctx = context(authenticated=False)
        ctx.kms.metrics.integrity_failures.labels(table).inc()
        record_alone(ctx, "integrity.failure", "rolled_back" if rolled_back else "detected",
                     target=f"{table}:{row_id}", actor="kms")
    except Exception as failure:  # noqa: BLE001 - the answer to the caller must not depend on this
        log_failure(log, logging.ERROR, "could not record an integrity failure", failure, _FAILURES)
