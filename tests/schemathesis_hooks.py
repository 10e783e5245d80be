"""Schemathesis hooks for tests/test_api_fuzz.py, which names this file in SCHEMATHESIS_HOOKS.

The fuzzing caller never acts on its own client record. An admin that demotes, disables or deletes
itself (once it has made another client an admin, it may) ends its own session at once, as it
should (tests/auth test that), and every request after that would be a 401 saying nothing about
the request. The caller's id (KMS_FUZZ_CALLER_ID) in a path is swapped for an unknown one.

A grant's `expiresAt` must be in the future, a rule of time that an OpenAPI schema cannot state
(its description does): a valid time already past is replaced by one a century ahead, so that a
schema-valid grant request is one the server should accept (tests/grants test the refusal)."""
import os
import uuid
from datetime import datetime, timedelta, timezone

import schemathesis

CALLER = os.environ.get("KMS_FUZZ_CALLER_ID")


@schemathesis.hook
def before_call(context, case, kwargs):
    if CALLER and (case.path_parameters or {}).get("client_id") == CALLER:
        case.path_parameters["client_id"] = str(uuid.uuid4())
    body = case.body if isinstance(case.body, dict) else {}
    if case.method.upper() == "POST" and case.path.endswith("/grants") and isinstance(body.get("expiresAt"), str):
        try:
            when = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
        except ValueError:
            return
        if when.tzinfo is not None and when <= datetime.now(timezone.utc):
            body["expiresAt"] = (datetime.now(timezone.utc) + timedelta(days=36525)).isoformat()
