"""Schemathesis hooks for tests/test_api_fuzz.py, which names this file in SCHEMATHESIS_HOOKS.

The fuzzing caller never acts on its own client record. An admin that demotes, disables or deletes
itself (once it has made another client an admin, it may) ends its own session at once, as it
should (tests/auth test that), and every request after that would be a 401 saying nothing about
the request. The caller's id (KMS_FUZZ_CALLER_ID) in a path is swapped for an unknown one."""
import os
import uuid

import schemathesis

CALLER = os.environ.get("KMS_FUZZ_CALLER_ID")


@schemathesis.hook
def before_call(context, case, kwargs):
    if CALLER and (case.path_parameters or {}).get("client_id") == CALLER:
        case.path_parameters["client_id"] = str(uuid.uuid4())
