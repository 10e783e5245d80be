"""Schemathesis hooks for tests/test_api_fuzz.py, which names this file in SCHEMATHESIS_HOOKS.

The fuzzing caller never acts on its own client record. An admin that demotes, disables or deletes
itself (once it has made another client an admin, it may) ends its own session at once, as it
should (tests/auth test that), and every request after that would be a 401 saying nothing about
the request. The caller's id (KMS_FUZZ_CALLER_ID) in a path is swapped for an unknown one.

A grant's `expiresAt` must be in the future, a rule of time that an OpenAPI schema cannot state
(its description does): a valid time already past is replaced by one a century ahead, so that a
schema-valid grant request is one the server should accept (tests/grants test the refusal). So is
a time past year 9999 in UTC, and a `contextSubset` past a context's size in bytes (its pairs are
bounded in the schema; its bytes, like a context's, cannot be)."""
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
            past = when.tzinfo is not None and when.astimezone(timezone.utc) <= datetime.now(timezone.utc)
        except ValueError:
            return
        except OverflowError:  # past year 9999 in UTC: refused too (400), as no time can hold it
            past = True
        if past:
            body["expiresAt"] = (datetime.now(timezone.utc) + timedelta(days=36525)).isoformat()
    subset = body.get("contextSubset") if case.method.upper() == "POST" and case.path.endswith("/grants") else None
    if isinstance(subset, dict) and sum(len(str(k).encode()) + len(str(v).encode()) for k, v in subset.items()) > 1024:
        body["contextSubset"] = {"tenant": "fuzz"}  # past a context's size in bytes (400), which OpenAPI cannot state
