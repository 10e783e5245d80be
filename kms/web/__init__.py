"""The HTTP layer every route shares: the error envelope (envelope.py) and the routing helpers
(routing.py). Infrastructure: nothing here knows a domain.

Below: the keys under which the layers pass a request's facts along in the WSGI environ.
"""
REQUEST_ID = "kms.request_id"  # the request's id, set by the request observer before anything else
CLAIMS = "kms.claims"  # the request's verified bearer-token claims (kms.auth.tokens)
ANSWERED_ENDPOINT = "kms.endpoint"  # the endpoint of a request answered before Flask (its route)
SHED = "kms.shed"  # a request refused in a flood before Flask ("login" or "unverified"): summed up in the log
UNVERIFIED_SOURCE = "kms.unverified_source"  # a request without a token the worker knows: its source
SIGNUP_TOKEN_REFUSED = "kms.signup_token_refused"  # a signup refused for its token (never usable): kms.serving.early


def caller_address(peer: str, x_forwarded_for: str | None, trusted_proxy_hops: int) -> str:
    """The caller's address as the application sees it: the peer's, or with TRUSTED_PROXY_HOPS the
    one X-Forwarded-For names that many hops from the right, as werkzeug's ProxyFix reads it."""
    if not trusted_proxy_hops:
        return peer
    forwarded = [part.strip() for part in (x_forwarded_for or "").split(",") if part.strip()]
    return forwarded[-trusted_proxy_hops] if len(forwarded) >= trusted_proxy_hops else peer
