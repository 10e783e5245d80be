"""The HTTP rules every route shares, operations endpoints, the factory and restarts."""
import subprocess
import sys

from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, ROOT, AuthActions, HttpClient, bare_env, bearer,
                            envelope, serve_in_thread, stop_server)


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
    response = client.post("/auth/login", data="x" * (70 * 1024), headers={"Content-Type": "application/json"})
    envelope(response, 413, "payload_too_large")


def test_json_array_body_is_400(client):
    envelope(client.post("/auth/login", json=[1, 2]), 400)


def test_unknown_fields_are_rejected(client):
    body = envelope(client.post("/auth/login", json={"clientname": "abcd", "password": "x", "admin": True}),
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


def test_restarting_against_the_same_database_keeps_the_data_and_the_admin(make_app, db):
    first = make_app()
    server, base_url = serve_in_thread(first)
    try:
        with HttpClient(base_url) as http:
            token = AuthActions(http).new_client("keeper-svc")
            dek = http.post("/keys/actions/generate", json={"keyReference": "kept"}, headers=bearer(token)).json()["dek"]
    finally:
        stop_server(server)
    first.extensions["kms"].close()
    second = make_app()  # a restart: migrations, secret checks and the first admin are in place already
    server, base_url = serve_in_thread(second)
    try:
        with HttpClient(base_url) as http:
            assert http.get("/keys/kept", headers=bearer(token)).json()["encryptWith"]["dek"] == dek
            assert AuthActions(http).login(ADMIN_NAME, ADMIN_PASSWORD)
    finally:
        stop_server(server)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE role = 'admin'")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM schema_migrations")
        assert cur.fetchone()[0] == len(list((ROOT / "sql" / "migrations").glob("*.sql")))


def test_importing_the_app_does_nothing(tmp_path):
    # No configuration, no database, an .env that would fail: importing must not read, connect,
    # start a thread or build an app.
    (tmp_path / ".env").write_text("KEK=not-a-key\n")
    program = ("import threading; import app, kms, kms.cli; "
               "assert threading.active_count() == 1, threading.enumerate(); "
               "from flask import Flask; "
               "assert not any(isinstance(v, Flask) for v in vars(app).values()); "
               "print('quiet')")
    env = bare_env()
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "quiet\n" and result.stderr == ""


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
    body = envelope(client.get("/keys/k1", headers=bearer(token)), 500, "integrity_error")
    assert "Traceback" not in body["message"] and "wrapped" not in body["message"]


def metric_value(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_show_what_an_operator_watches(client, auth, db):
    token = auth.new_client("metered-svc")
    h = bearer(token)
    assert client.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=h).status_code == 200
    assert client.get("/keys/k1", headers=h).status_code == 200
    assert client.get("/keys/nope", headers=h).status_code == 404
    assert client.post("/keys/k1/actions/set-rotation-period", json={"rotationPeriod": 60_000},
                       headers=h).status_code == 200
    with db.cursor() as cur:  # its version is now older than its period: the cron has work
        cur.execute("UPDATE key_versions SET created_at = now() - interval '2 minutes'")
    for _ in range(5):
        client.post("/auth/login", json={"clientname": "metered-svc", "password": "Wrong-passw0rd!"})
    assert client.post("/auth/login", json={"clientname": "metered-svc", "password": "Wrong-passw0rd!"}) \
        .status_code == 429
    text = client.get("/metrics").text
    assert metric_value(text, 'kms_key_operations_total{action="generate",outcome="success"}') == 1
    assert metric_value(text, 'kms_key_operations_total{action="lookup",outcome="success"}') == 1
    assert metric_value(text, 'kms_key_operations_total{action="lookup",outcome="not_found"}') == 1
    assert metric_value(text, 'kms_logins_total{outcome="unauthenticated"}') == 5
    assert metric_value(text, 'kms_logins_total{outcome="throttled"}') == 1
    assert metric_value(text, "kms_keys_rotation_due") == 1
    assert metric_value(text, "kms_keys_destruction_due") == 0
    assert metric_value(text, 'kms_kek_wrapped_dek_versions{kek_version="1"}') == 1
    assert metric_value(text, "kms_kek_active_version") == 1
    assert metric_value(text, "kms_audit_unsealed_events") >= 8  # nothing seals in these tests
    assert metric_value(text, "kms_audit_unsealed_oldest_seconds") > 0
    assert metric_value(text, "kms_db_pool_connections") == 4
    assert metric_value(text, "kms_db_pool_connections_in_use") == 0  # sampled before the scrape reads the database
    assert metric_value(text, "kms_db_pool_waiting") == 0
    assert metric_value(text, "kms_metrics_database_up") == 1


def test_openapi_documents_the_probes_and_metrics(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert paths["/healthz"]["get"]["security"] == [] and paths["/metrics"]["get"]["security"] == []
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


def test_a_database_without_an_admin_warns_how_to_make_one(make_app, captured_logs):
    make_app(MASTER_ADMIN_USERNAME="", MASTER_ADMIN_PASSWORD="")
    warnings = [line for line in captured_logs.getvalue().splitlines() if '"level": "warning"' in line]
    assert any("no active admin exists" in line and "kms create-admin" in line for line in warnings), warnings
