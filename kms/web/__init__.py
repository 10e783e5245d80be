"""The HTTP layer every route shares: the error envelope (envelope.py) and the routing helpers
(routing.py). Infrastructure: nothing here knows a domain.

Below: the keys under which the layers pass a request's facts along in the WSGI environ.
"""
REQUEST_ID = "kms.request_id"  # the request's id, set by the request observer before anything else
CLAIMS = "kms.claims"  # the request's verified bearer-token claims (kms.auth.tokens)
ANSWERED_ENDPOINT = "kms.endpoint"  # the endpoint of a request answered before Flask (its route)
SHED = "kms.shed"  # a request refused in a flood before Flask ("login" or "unverified"): summed up in the log
UNVERIFIED_SOURCE = "kms.unverified_source"  # a request without a token the worker knows: its source
