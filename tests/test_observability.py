
"""Metrics and log lines: what an operator watches, labelled by route template, never by raw path,
and never grown by what a caller invents."""
import http.client
import json
import logging
import time
import uuid

import pytest

from kms.observability.logs import JsonFormatter
from tests.conftest import bearer


def test_invented_methods_and_paths_do_not_grow_metrics(live_server, client):
    port = int(live_server.rsplit(":", 1)[1])

    def invent(count):
        for i in range(count):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(f"X{uuid.uuid4().hex[:10].upper()}", f"/nowhere/{uuid.uuid4().hex}")
            assert conn.getresponse().status == 404  # no route has the path: its method is not looked at
            conn.close()
        return client.get("/metrics").text

    client.get("/metrics")  # the scrape's own series exist from here on
    first = invent(20)
    then = invent(300)
    assert "/nowhere" not in then and 'method="other"' in then
    assert len(then.splitlines()) == len(first.splitlines())  # 300 more inventions, not one more series


def test_metrics_label_route_templates_not_raw_paths(client, auth):
    token = auth.new_client()
    client.get("/keys/secret-reference-name", headers=bearer(token))
    text = client.get("/metrics").text
    assert 'route="/keys/<ref>"' in text
    assert "secret-reference-name" not in text
    assert "kms_http_request_duration_seconds_bucket" in text


def metric_value(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.own_app
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
    with db.cursor() as cur:  # nothing seals in these tests: every event so far
        cur.execute("SELECT count(*) FROM audit_events WHERE chain_pos IS NULL")
        assert metric_value(text, "kms_audit_unsealed_events") == cur.fetchone()[0]
    assert metric_value(text, "kms_audit_unsealed_oldest_seconds") > 0
    assert metric_value(text, "kms_db_pool_connections") == 4
    assert metric_value(text, "kms_db_pool_connections_in_use") == 0  # sampled before the scrape reads the database
    assert metric_value(text, "kms_db_pool_waiting") == 0
    assert metric_value(text, "kms_metrics_database_up") == 1


def test_a_log_line_is_the_json_it_always_was():
    """The formatter's cached C encoder and once-a-second timestamp write the same bytes as
    json.dumps(default=str) over the record, non-ASCII and values JSON cannot hold included."""
    formatter = JsonFormatter()
    stranger = object()
    for created_offset in (0.0, 0.999, 1.0, 3600.5):
        record = logging.getLogger("kms.access").makeRecord(
            "kms.access", logging.INFO, None, 0, "request", (), None,
            extra={"requestId": "r-1", "status": 200, "durationMs": 1.25, "route": "/keys/<ref>", "note": "é\u2028\"",
                   "odd": stranger, "nothing": None, "nested": {"a": [1, 2.5, True]}})
        record.created += created_offset
        record.msecs = (record.created - int(record.created)) * 1000
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}+00:00", "level": "info", "logger": "kms.access", "msg": "request",
                 "requestId": "r-1", "status": 200, "durationMs": 1.25, "route": "/keys/<ref>", "note": "é\u2028\"",
                 "odd": stranger, "nothing": None, "nested": {"a": [1, 2.5, True]}}
        assert formatter.format(record) == json.dumps(entry, default=str)
