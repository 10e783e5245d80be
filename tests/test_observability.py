
"""Metrics and log lines: what an operator watches, labelled by route template, never by raw path,
and never grown by what a caller invents."""
import http.client
import uuid

import pytest

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


def test_folding_dead_processes_keeps_counts_and_max_gauges_and_drops_live_gauges(tmp_path):
    """Three processes' files, as prometheus-client's multiprocess mode writes them; two die: the
    scrape reads the same counters, histograms and max gauges from the live one's files and one
    aggregate per kind, and the dead ones' live gauges are gone."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.multiprocess import MultiProcessCollector

    from kms.observability.metrics import fold_dead_process

    def write(kind: str, pid: int, values: list):
        file = MmapedDict(str(tmp_path / f"{kind}_{pid}.db"))
        for metric, sample, labels, value in values:
            file.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), "help"), value, 0.0)
        file.close()

    for pid, served, in_use, head in ((101, 3, 2, 7), (102, 5, 4, 9), (103, 11, 1, 8)):
        write("counter", pid, [("kms_x", "kms_x_total", {"route": "/a"}, served)])
        write("histogram", pid, [("kms_t", "kms_t_bucket", {"le": "0.1"}, served),
                                 ("kms_t", "kms_t_bucket", {"le": "+Inf"}, 0),
                                 ("kms_t", "kms_t_sum", {}, served / 4)])
        write("gauge_livesum", pid, [("kms_pool", "kms_pool", {}, in_use)])
        write("gauge_max", pid, [("kms_head", "kms_head", {}, head)])

    def scrape() -> dict:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))
        lines = generate_latest(registry).decode().splitlines()
        return dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))

    before = scrape()
    assert before["kms_x_total{route=\"/a\"}"] == "19.0" and before["kms_pool"] == "7.0"
    fold_dead_process(101, str(tmp_path))
    fold_dead_process(102, str(tmp_path))
    after = scrape()
    assert after.pop("kms_pool") == "1.0"  # only the live process's pool
    before.pop("kms_pool")
    assert after == before  # counters, histogram buckets, sum and count, the max gauge
    assert sorted(path.name for path in tmp_path.glob("*.db")) == [
        "counter_103.db", "counter_dead.db", "gauge_livesum_103.db", "gauge_max_103.db", "gauge_max_dead.db",
        "histogram_103.db", "histogram_dead.db"]
    fold_dead_process(103, str(tmp_path))
    assert scrape()["kms_head"] == "9.0"  # a max gauge of the dead is kept, as prometheus-client keeps it
    assert sorted(path.name for path in tmp_path.glob("*.db")) == [
        "counter_dead.db", "gauge_max_dead.db", "histogram_dead.db"]
