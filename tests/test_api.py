"""The HTTP rules every route shares (kms.web, kms.app): the error envelope, request ids, the probes, the
OpenAPI document, hostile bodies, and authentication before validation."""
import json

import pytest

from tests.conftest import ADMIN_NAME, CLIENT_PASSWORD, bearer, envelope


def test_every_response_carries_a_fresh_request_id(client):
    first, second = client.get("/healthz"), client.get("/healthz")
    assert first.status_code == 200 and first.json() == {"status": "ok"}
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


def test_readyz_reports_the_current_schema(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_readyz_is_503_when_the_schema_is_behind(client, db):
    with db.cursor() as cur:
        cur.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations) "
                    "RETURNING version, name")
        version, name = cur.fetchone()
    try:
        response = client.get("/readyz")
        envelope(response, 503, "not_ready")
        assert "Retry-After" in response.headers
    finally:
        with db.cursor() as cur:
            cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))


def test_unknown_route_is_a_json_404(client):
    envelope(client.get("/no/such/route"), 404, "not_found")


def test_wrong_method_is_a_json_405(client):
    envelope(client.put("/healthz"), 405, "method_not_allowed")


def test_malformed_json_is_400(client):
    response = client.post("/auth/login", data="{not json", headers={"Content-Type": "application/json"})
    envelope(response, 400, "bad_request")


def test_non_json_body_is_415(client):
    response = client.post("/auth/login", data="clientname=a", headers={"Content-Type": "text/plain"})
    envelope(response, 415, "unsupported_media_type")


def test_body_over_the_limit_is_413(client):
    response = client.post("/auth/login", data="x" * (1024 * 1024 + 1), headers={"Content-Type": "application/json"})
    envelope(response, 413, "payload_too_large")


def test_json_array_body_is_400(client):
    envelope(client.post("/auth/login", json=[1, 2]), 400)


def test_unknown_fields_are_rejected(client):
    body = envelope(client.post("/auth/login", json={"clientname": "abcd", "password": "x", "admin": True}),
                           400, "validation_failed")
    assert body["fields"] == {"admin": ["Unknown field."]}


def test_openapi_document_comes_from_the_request_schemas(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/keys/actions/generate" in spec["paths"]
    assert "/keys/{ref}/actions/rotate" in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert schemas["GenerateKeyRequest"]["properties"]["keyReference"]["pattern"] == "^[A-Za-z0-9-]{1,64}\\Z"
    assert schemas["SignupTokenRequest"]["properties"]["ttl"]["maximum"] == 30 * 24 * 3600 * 1000


def test_server_errors_never_leak_internals(app, client, auth, db):
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=bearer(token))
    with db.cursor() as cur:  # corrupt the stored ciphertext's format byte
        cur.execute("UPDATE key_versions SET wrapped_dek = '\\x02'::bytea || substring(wrapped_dek from 2)")
    body = envelope(client.get("/keys/k1", headers=bearer(token)), 500, "integrity_error")
    assert "Traceback" not in body["message"] and "wrapped" not in body["message"]


def test_openapi_documents_the_probes_and_metrics(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503", "default"}  # default: the error envelope
    assert paths["/healthz"]["get"]["security"] == [] and paths["/metrics"]["get"]["security"] == []
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


# Hostile bodies, methods no route has, and the order of the checks

HOSTILE_BODIES = {
    "nested 1,000 deep": "[" * 1000 + "]" * 1000,
    "object nested 1,000 deep": '{"a":' * 1000 + "1" + "}" * 1000,
    "5,000-digit number": '{"clientname": ' + "9" * 5000 + "}",
    "invalid UTF-8": b'{"clientname": "\xff\xfe"}'.decode("latin-1"),
    "NaN": '{"clientname": NaN, "password": "x"}',
}


def raw_json(client, path, text, token=None):
    headers = {"Content-Type": "application/json", **(bearer(token) if token else {})}
    return client.post(path, data=text.encode("utf-8", "surrogatepass"), headers=headers)


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("path", ["/auth/login", "/auth/signup"])
def test_hostile_json_is_a_400_envelope(client, path, name):
    text = HOSTILE_BODIES[name]
    data = text.encode("latin-1") if name == "invalid UTF-8" else text.encode()
    response = client.post(path, data=data, headers={"Content-Type": "application/json"})
    envelope(response, 400)


@pytest.mark.parametrize("path,body", [
    ("/auth/login", {"clientname": "\ud800", "password": "x"}),
    ("/auth/login", {"clientname": ADMIN_NAME, "password": "Aa1!\udfff-passw0rd"}),
    ("/auth/signup", {"token": "kms_st_\ud800", "password": CLIENT_PASSWORD}),
    ("/auth/login", {"\ud800": 1}),
])
def test_lone_surrogates_are_400_on_public_routes(client, path, body):
    envelope(raw_json(client, path, json.dumps(body)), 400)


def test_lone_surrogates_are_400_on_authenticated_routes_and_keep_the_signup_token(client, auth):
    admin = auth.admin_token
    envelope(raw_json(client, "/auth/signup/generate", json.dumps({"clientname": "svc-\ud800"}), admin), 400)
    signup_token = auth.signup_token("surrogate-svc")
    refused = raw_json(client, "/auth/signup", json.dumps({"token": signup_token, "password": "Aa1!\ud800-passw0rd"}))
    envelope(refused, 400)
    token = client.post("/auth/signup", json={"token": signup_token, "password": CLIENT_PASSWORD}).json()["token"]
    envelope(raw_json(client, "/keys/actions/generate", json.dumps({"keyReference": "k\ud800"}), token), 400)
    envelope(raw_json(client, "/keys/actions/generate", "[" * 1000 + "]" * 1000, token), 400)


def test_routes_authenticate_before_they_validate(client):
    for method, path, body in [("get", "/keys/0/0", None), ("get", "/keys/bad!ref", None), ("get", "/keys/k/0", None),
                               ("post", "/keys/actions/generate", {"keyReference": "!!"}),
                               ("post", "/auth/signup/generate", {"nope": 1}),
                               ("post", "/clients/not-a-uuid/role", {"role": "x"}),
                               ("get", "/audit?limit=-4", None)]:
        response = getattr(client, method)(path, json=body)
        assert envelope(response, 401)["error"] == "unauthorized", (method, path)


def test_options_is_not_allowed_and_405_names_what_is(client):
    for path in ["/keys", "/auth/login", "/keys/k/1", "/healthz"]:
        assert envelope(client.options(path), 405)["error"] == "method_not_allowed"
    assert client.options("/keys/actions/generate").headers["Allow"] == "POST"
    assert client.delete("/keys").headers["Allow"] == "GET, HEAD"


def test_openapi_documents_the_path_parameters_the_server_enforces(client):
    paths = client.get("/openapi.json").json()["paths"]
    parameters = {p["name"]: p["schema"] for p in paths["/keys/{ref}/{version}"]["parameters"]}
    assert parameters["ref"]["pattern"] == "^(?:[A-Za-z0-9-]{4,64}:)?[A-Za-z0-9-]{1,64}$"  # {owner}:{ref} too
    assert parameters["ref"]["maxLength"] == 64 + 1 + 64
    assert parameters["version"] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    client_parameters = {p["name"]: p["schema"] for p in paths["/clients/{client_id}/role"]["parameters"]}
    assert client_parameters["client_id"]["format"] == "uuid"


def test_the_callers_address_is_read_as_proxyfix_reads_it():
    """One function for the dispatcher, the flood shedder and werkzeug's ProxyFix to agree on."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    from kms.web import caller_address
    for hops, forwarded in ((0, "1.1.1.1"), (1, "1.1.1.1"), (1, "6.6.6.6, 1.1.1.1"), (2, "6.6.6.6, 1.1.1.1"),
                            (2, "1.1.1.1"), (1, "")):
        seen = {}
        ProxyFix(lambda environ, _start: seen.update(addr=environ["REMOTE_ADDR"]) or [], x_for=hops)(
            {"REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_FOR": forwarded, "wsgi.url_scheme": "http",
             "HTTP_HOST": "kms", "SERVER_NAME": "kms", "SERVER_PORT": "80"}, None)
        assert caller_address("10.0.0.9", forwarded, hops) == seen["addr"], (hops, forwarded)
