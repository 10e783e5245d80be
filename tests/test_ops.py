"""The HTTP rules every route shares, operations endpoints, the factory and restarts."""

from tests.conftest import bearer


def assert_envelope(response, status, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "message", "requestId"}
    assert body["requestId"] == response.headers["X-Request-ID"]
    if code:
        assert body["error"] == code
    return body


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
        assert_envelope(response, 503, "not_ready")
        assert "Retry-After" in response.headers
    finally:
        with db.cursor() as cur:
            cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))


def test_unknown_route_is_a_json_404(client):
    assert_envelope(client.get("/no/such/route"), 404, "not_found")


def test_wrong_method_is_a_json_405(client):
    assert_envelope(client.put("/healthz"), 405, "method_not_allowed")


def test_malformed_json_is_400(client):
    response = client.post("/auth/login", data="{not json", headers={"Content-Type": "application/json"})
    assert_envelope(response, 400, "bad_request")


def test_non_json_body_is_415(client):
    response = client.post("/auth/login", data="clientname=a", headers={"Content-Type": "text/plain"})
    assert_envelope(response, 415, "unsupported_media_type")


def test_body_over_the_limit_is_413(client):
    response = client.post("/auth/login", data="x" * (70 * 1024), headers={"Content-Type": "application/json"})
    assert_envelope(response, 413, "payload_too_large")


def test_json_array_body_is_400(client):
    assert_envelope(client.post("/auth/login", json=[1, 2]), 400)


def test_unknown_fields_are_rejected(client):
    body = assert_envelope(client.post("/auth/login", json={"clientname": "abcd", "password": "x", "admin": True}),
                           400, "validation_failed")
    assert body["fields"] == {"admin": ["Unknown field."]}


def test_metrics_label_route_templates_not_raw_paths(client, auth):
    token = auth.new_client()
    client.get("/keys/secret-reference-name", headers=bearer(token))
    text = client.get("/metrics").text
    assert 'route="/keys/<ref>"' in text
    assert "secret-reference-name" not in text
    assert "kms_http_request_duration_seconds_bucket" in text


def test_openapi_document_comes_from_the_request_schemas(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/keys/actions/generate" in spec["paths"]
    assert "/keys/{ref}/actions/rotate" in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert schemas["GenerateKeyRequest"]["properties"]["keyReference"]["pattern"] == "^[A-Za-z0-9-]{1,64}\\Z"
    assert schemas["SignupTokenRequest"]["properties"]["ttl"]["maximum"] == 30 * 24 * 3600 * 1000


def test_restarting_against_the_same_database_keeps_working(make_app, base_env):
    first = make_app()
    second = make_app()  # a second start: migrations, secret checks and the first admin are in place
    with second.extensions["kms"].pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE role = 'admin'")
        assert cur.fetchone()[0] == 1
    assert first is not second


def test_app_factory_has_no_side_effects_at_import():
    import importlib
    import sys
    for name in [m for m in sys.modules if m == "app"]:
        del sys.modules[name]
    module = importlib.import_module("app")
    assert callable(module.create_app)
    assert not hasattr(module, "app")


def test_cli_gen_secret_prints_a_32_byte_key(runner):
    from kms.config import decode_key
    result = runner.invoke(args=["kms", "gen-secret"])
    assert result.exit_code == 0
    assert len(decode_key("X", result.output.strip())) == 32


def test_cli_migrate_reports_a_current_schema(runner):
    result = runner.invoke(args=["kms", "migrate"])
    assert result.exit_code == 0, result.output
    assert "schema is current" in result.output


def test_server_errors_never_leak_internals(app, client, auth, db):
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=bearer(token))
    with db.cursor() as cur:  # corrupt the stored ciphertext's format byte
        cur.execute("UPDATE key_versions SET wrapped_dek = '\\x02'::bytea || substring(wrapped_dek from 2)")
    body = assert_envelope(client.get("/keys/k1", headers=bearer(token)), 500, "integrity_error")
    assert "Traceback" not in body["message"] and "wrapped" not in body["message"]
