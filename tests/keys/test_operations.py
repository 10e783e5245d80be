"""Keys that never leave the KMS: encrypt, decrypt, reencrypt and generate-data-key on the server,
through the HTTP API against a real PostgreSQL."""
import base64
import json
import os

import pytest

from tests.conftest import bearer, envelope, tamper


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def token(auth, client):
    token = auth.new_client("ops-owner")
    for ref in ("orders", "other"):
        assert client.post("/keys/actions/generate", json={"keyReference": ref}, headers=bearer(token)).status_code == 200
    return token


def call(client, token, ref, action, body):
    return client.post(f"/keys/{ref}/actions/{action}", json=body, headers=bearer(token))


def encrypt(client, token, plaintext=b"card 4111", context=None, ref="orders"):
    body = {"plaintext": b64(plaintext)}
    if context is not None:
        body["context"] = context
    response = call(client, token, ref, "encrypt", body)
    assert response.status_code == 200, response.text
    return response.json()


def decrypt(client, token, ciphertext, context=None, ref="orders"):
    body = {"ciphertext": ciphertext}
    if context is not None:
        body["context"] = context
    return call(client, token, ref, "decrypt", body)


CONTEXT = {"tenant": "acme", "table": "orders"}


def test_encrypt_then_decrypt_gives_the_plaintext_back(client, token):
    sealed = encrypt(client, token, b"\x00secret\xff", CONTEXT)
    assert sealed["version"] == 1 and set(sealed) == {"ciphertext", "version"}
    response = decrypt(client, token, sealed["ciphertext"], {"table": "orders", "tenant": "acme"})  # any order
    assert response.status_code == 200, response.text
    assert unb64(response.json()["plaintext"]) == b"\x00secret\xff" and response.json()["version"] == 1
    assert response.headers["Cache-Control"] == "no-store"


def test_two_encryptions_of_one_plaintext_differ(client, token):
    assert encrypt(client, token)["ciphertext"] != encrypt(client, token)["ciphertext"]


def test_the_empty_plaintext_and_no_context_round_trip(client, token):
    sealed = encrypt(client, token, b"")
    assert unb64(decrypt(client, token, sealed["ciphertext"]).json()["plaintext"]) == b""
    # no context and an empty one are the same context
    assert decrypt(client, token, sealed["ciphertext"], {}).status_code == 200


FAILED = None  # the one answer every bad ciphertext gets; filled by the first


def failed(response) -> dict:
    body = envelope(response, 400, "decryption_failed")
    return {"error": body["error"], "message": body["message"]}


@pytest.mark.parametrize("wrong", [{}, {"tenant": "acme"}, {"tenant": "acme", "table": "invoices"},
                                   {"tenant": "acme", "table": "orders", "extra": ""}, {"tenantt": "acme", "able": "orders"}])
def test_a_ciphertext_decrypts_only_with_its_context(client, token, wrong):
    sealed = encrypt(client, token, b"x", CONTEXT)
    failed(decrypt(client, token, sealed["ciphertext"], wrong))


def ciphertext_fields(raw: bytes) -> dict:
    """Where each field of the format lies (docs/API.md, "Ciphertext format")."""
    return {"format": slice(0, 1), "key id": slice(1, 17), "version": slice(17, 21), "nonce": slice(21, 33),
            "body": slice(33, len(raw) - 16), "tag": slice(len(raw) - 16, len(raw))}


@pytest.mark.parametrize("field", ["format", "key id", "version", "nonce", "body", "tag"])
def test_altering_any_field_of_a_ciphertext_gets_the_one_generic_answer(client, token, field):
    assert call(client, token, "orders", "rotate", None).status_code == 200  # version 2 exists: a version edit names it
    sealed = encrypt(client, token, b"sixteen bytes!!!", CONTEXT)
    raw = bytearray(unb64(sealed["ciphertext"]))
    where = ciphertext_fields(raw)[field]
    raw[where.start] ^= 0x01 if field != "version" else 0x00
    if field == "version":
        raw[20] = 1  # version 2 -> 1: a real version of this key, the wrong one
    answers = [failed(decrypt(client, token, b64(bytes(raw)), CONTEXT))]
    # and every other kind of wrong gets the very same answer
    answers.append(failed(decrypt(client, token, sealed["ciphertext"], {"tenant": "other"})))
    answers.append(failed(decrypt(client, token, b64(bytes(raw[:-1])), CONTEXT)))  # truncated
    answers.append(failed(decrypt(client, token, b64(bytes(raw) + b"\x00"), CONTEXT)))  # extended
    answers.append(failed(decrypt(client, token, "not base64url!", CONTEXT)))
    answers.append(failed(decrypt(client, token, b64(b"\x01" + bytes(80)), CONTEXT)))
    answers.append(failed(decrypt(client, token, encrypt(client, token, b"x", CONTEXT, ref="other")["ciphertext"],
                                  CONTEXT)))  # another key's
    assert all(answer == answers[0] for answer in answers)


def test_a_version_beyond_the_current_one_is_the_generic_answer(client, token):
    raw = bytearray(unb64(encrypt(client, token)["ciphertext"]))
    raw[17:21] = (7).to_bytes(4, "big")
    failed(decrypt(client, token, b64(bytes(raw))))


def test_rotate_retire_and_delete(client, token):
    first = encrypt(client, token, b"one", CONTEXT)
    assert call(client, token, "orders", "rotate", None).status_code == 200
    second = encrypt(client, token, b"two", CONTEXT)
    assert second["version"] == 2
    assert unb64(decrypt(client, token, first["ciphertext"], CONTEXT).json()["plaintext"]) == b"one"
    moved = call(client, token, "orders", "reencrypt", {"ciphertext": first["ciphertext"], "context": CONTEXT})
    assert moved.status_code == 200 and moved.json()["version"] == 2
    assert call(client, token, "orders", "retire", {"belowVersion": 2}).status_code == 200
    envelope(decrypt(client, token, first["ciphertext"], CONTEXT), 410, "version_retired")
    assert unb64(decrypt(client, token, moved.json()["ciphertext"], CONTEXT).json()["plaintext"]) == b"one"
    assert client.delete("/keys/orders/actions/delete", headers=bearer(token)).status_code == 204
    envelope(decrypt(client, token, second["ciphertext"], CONTEXT), 404, "not_found")
    envelope(call(client, token, "orders", "encrypt", {"plaintext": b64(b"x")}), 404, "not_found")
    envelope(call(client, token, "orders", "generate-data-key", {}), 404, "not_found")


def test_a_key_of_another_client_is_not_found(client, token, auth):
    stranger = auth.new_client("ops-stranger")
    sealed = encrypt(client, token)
    envelope(decrypt(client, stranger, sealed["ciphertext"]), 404, "not_found")
    envelope(call(client, stranger, "orders", "encrypt", {"plaintext": b64(b"x")}), 404)


def test_reencrypt_moves_a_ciphertext_to_another_key_and_context(client, token):
    sealed = encrypt(client, token, b"move me", CONTEXT)
    moved = call(client, token, "orders", "reencrypt", {"ciphertext": sealed["ciphertext"], "context": CONTEXT,
                                                         "toKeyReference": "other", "toContext": {"tenant": "beta"}})
    assert moved.status_code == 200, moved.text
    target = moved.json()["ciphertext"]
    assert unb64(decrypt(client, token, target, {"tenant": "beta"}, ref="other").json()["plaintext"]) == b"move me"
    failed(decrypt(client, token, target, CONTEXT, ref="other"))
    failed(decrypt(client, token, target, {"tenant": "beta"}, ref="orders"))
    nowhere = call(client, token, "orders", "reencrypt", {"ciphertext": sealed["ciphertext"], "context": CONTEXT,
                                                           "toKeyReference": "no-such-key"})
    envelope(nowhere, 404, "not_found")
    failed(call(client, token, "orders", "reencrypt", {"ciphertext": sealed["ciphertext"], "toKeyReference": "other"}))


def test_generate_data_key_with_and_without_its_plaintext(client, token):
    response = call(client, token, "orders", "generate-data-key", {"context": CONTEXT})
    assert response.status_code == 200, response.text
    body = response.json()
    data_key = unb64(body["plaintext"])
    assert len(data_key) == 32 and body["version"] == 1
    assert unb64(decrypt(client, token, body["ciphertext"], CONTEXT).json()["plaintext"]) == data_key
    wrapped_only = call(client, token, "orders", "generate-data-key", {"context": CONTEXT, "plaintext": False}).json()
    assert set(wrapped_only) == {"ciphertext", "version"}
    assert len(unb64(decrypt(client, token, wrapped_only["ciphertext"], CONTEXT).json()["plaintext"])) == 32


def test_a_batch_answers_each_item_in_order_with_mixed_failures(client, token, db):
    old = encrypt(client, token, b"old", CONTEXT)["ciphertext"]
    assert call(client, token, "orders", "rotate", None).status_code == 200
    good = encrypt(client, token, b"good", CONTEXT)["ciphertext"]
    assert call(client, token, "orders", "retire", {"belowVersion": 2}).status_code == 200
    items = [{"ciphertext": good, "context": CONTEXT},
             {"ciphertext": good, "context": {"tenant": "x"}},
             {"ciphertext": old, "context": CONTEXT},
             {"ciphertext": "%%%", "context": CONTEXT},
             {"ciphertext": good, "context": {str(n): "v" for n in range(17)}},
             {"ciphertext": good, "context": CONTEXT, "surprise": 1},
             {"ciphertext": good, "context": CONTEXT}]
    response = call(client, token, "orders", "decrypt", {"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r.get("error") for r in results] == [None, "decryption_failed", "version_retired", "decryption_failed",
                                                 "context_too_large", "validation_failed", None]
    assert unb64(results[0]["plaintext"]) == unb64(results[6]["plaintext"]) == b"good"
    assert results[2]["status"] == 410 and results[1]["status"] == 400
    events = tamper(db, "SELECT action, outcome, version, detail FROM audit_events WHERE action = 'key.decrypt' "
                        "ORDER BY seq DESC LIMIT 1")
    action, outcome, version, detail = events[0]
    detail = json.loads(detail)
    assert (action, outcome, version) == ("key.decrypt", "partial", None)
    assert detail["items"] == 7 and detail["failed"] == 5 and detail["versions"] == [1, 2]
    assert detail["errors"] == {"decryption_failed": 2, "version_retired": 1, "context_too_large": 1,
                                "validation_failed": 1}


def test_an_encrypt_batch_refuses_bad_items_alone(client, token):
    big = os.urandom(4097)
    items = [{"plaintext": b64(b"a")}, {"plaintext": "not base64!"}, {"plaintext": b64(big)},
             {"plaintext": b64(b"b"), "context": {"k": 1}}, {"plaintext": b64(b"c"), "context": {"k" * 1025: ""}},
             "not an object", {"plaintext": b64(os.urandom(4096))}]
    response = call(client, token, "orders", "encrypt", {"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r.get("error") for r in results] == [None, "validation_failed", "plaintext_too_large",
                                                 "validation_failed", "context_too_large", "validation_failed", None]
    decrypted = call(client, token, "orders", "decrypt", {"items": [{"ciphertext": results[0]["ciphertext"]},
                                                                    {"ciphertext": results[6]["ciphertext"]}]})
    assert [unb64(r["plaintext"]) for r in decrypted.json()["results"]][0] == b"a"


def test_batch_bounds(client, token):
    envelope(call(client, token, "orders", "encrypt", {"items": [{"plaintext": ""}] * 101}), 400, "too_many_items")
    envelope(call(client, token, "orders", "encrypt", {"items": []}), 400, "validation_failed")
    envelope(call(client, token, "orders", "encrypt", {"items": [{"plaintext": ""}], "plaintext": ""}), 400)
    envelope(call(client, token, "orders", "encrypt", {"plaintext": b64(bytes(4097))}), 400, "plaintext_too_large")
    envelope(call(client, token, "orders", "encrypt", {"plaintext": "a"}), 400, "validation_failed")
    envelope(call(client, token, "orders", "encrypt", {"plaintext": b64(b"x"),
                                                       "context": {str(n): "" for n in range(17)}}), 400,
             "context_too_large")
    assert call(client, token, "orders", "encrypt", {"items": [{"plaintext": ""}] * 100}).status_code == 200


def test_one_audit_record_per_batch_and_never_a_value(client, token, db):
    secret_context = {"patient": "jane-doe-1970"}
    plaintext = b"diagnosis: confidential"
    sealed = call(client, token, "orders", "encrypt", {"items": [{"plaintext": b64(plaintext),
                                                                 "context": secret_context}] * 3}).json()
    ciphertext = sealed["results"][0]["ciphertext"]
    call(client, token, "orders", "decrypt", {"items": [{"ciphertext": ciphertext, "context": secret_context}] * 3})
    rows = tamper(db, "SELECT action, outcome, detail FROM audit_events WHERE action LIKE 'key.%%crypt' ORDER BY seq")
    assert [(row[0], row[1]) for row in rows] == [("key.encrypt", "success"), ("key.decrypt", "success")]
    assert json.loads(rows[0][2]) == {"items": 3, "failed": 0, "versions": [1], "contextKeys": ["patient"]}
    everything = json.dumps(tamper(db, "SELECT * FROM audit_events"), default=str)
    for value in ("jane-doe-1970", b64(plaintext), plaintext.decode(), ciphertext[:40]):
        assert value not in everything


def test_operations_are_counted_by_action_and_outcome(client, token):
    sealed = encrypt(client, token)
    decrypt(client, token, sealed["ciphertext"], {"wrong": "context"})
    call(client, token, "orders", "decrypt", {"items": [{"ciphertext": sealed["ciphertext"]}] * 2})
    text = client.get("/metrics").text
    assert 'kms_key_operation_items_total{action="decrypt",outcome="decryption_failed"}' in text
    assert 'kms_key_operation_items_total{action="decrypt",outcome="success"}' in text
    assert 'kms_key_operations_total{action="encrypt",outcome="success"}' in text
    assert 'kms_key_operations_total{action="decrypt",outcome="invalid"}' in text


def test_the_operations_are_in_the_openapi_document(client):
    spec = client.get("/openapi.json").json()
    for action, request in (("encrypt", "EncryptRequest"), ("decrypt", "DecryptRequest"),
                            ("reencrypt", "ReencryptRequest"), ("generate-data-key", "DataKeyRequest"),
                            ("set-exportable", "SetExportableRequest")):
        operation = spec["paths"][f"/keys/{{ref}}/actions/{action}"]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(request)
        assert "200" in operation["responses"]
    items = spec["components"]["schemas"]["EncryptRequest"]["properties"]["items"]
    assert items["type"] == "array" and items["maxItems"] == 100 and "`plaintext`, `context`" in items["description"]


# Keys that are not exportable

def generate(client, token, ref, **extra):
    return client.post("/keys/actions/generate", json={"keyReference": ref, **extra}, headers=bearer(token))


def test_a_non_exportable_key_never_yields_its_dek(client, token):
    made = generate(client, token, "vault", exportable=False)
    assert made.status_code == 200 and made.json() == {"version": 1, "exportable": False}
    envelope(client.get("/keys/vault", headers=bearer(token)), 409, "not_exportable")
    envelope(client.get("/keys/vault/1", headers=bearer(token)), 409, "not_exportable")
    rotated = call(client, token, "vault", "rotate", None)
    assert rotated.status_code == 200 and rotated.json() == {"version": 2, "exportable": False}
    envelope(client.get("/keys/vault/2", headers=bearer(token)), 409, "not_exportable")
    listed = {key["keyReference"]: key["exportable"] for key in client.get("/keys", headers=bearer(token)).json()["keys"]}
    assert listed == {"orders": True, "other": True, "vault": False}
    # and it works on the server
    sealed = encrypt(client, token, b"inside", CONTEXT, ref="vault")
    assert unb64(decrypt(client, token, sealed["ciphertext"], CONTEXT, ref="vault").json()["plaintext"]) == b"inside"


def test_exportability_turns_off_and_never_on(client, token, db):
    assert client.get("/keys/orders", headers=bearer(token)).status_code == 200
    turned = call(client, token, "orders", "set-exportable", {"exportable": False})
    assert turned.status_code == 200 and turned.json()["exportable"] is False
    envelope(client.get("/keys/orders", headers=bearer(token)), 409, "not_exportable")
    envelope(call(client, token, "orders", "set-exportable", {"exportable": True}), 400, "validation_failed")
    assert call(client, token, "orders", "set-exportable", {"exportable": False}).status_code == 200  # stays off
    envelope(client.get("/keys/orders", headers=bearer(token)), 409, "not_exportable")
    assert tamper(db, "SELECT count(*) FROM audit_events WHERE action = 'key.set_exportable'")[0][0] == 1


@pytest.mark.own_app
def test_a_database_writer_turning_exportability_back_on_is_refused(client, token, db):
    assert generate(client, token, "vault", exportable=False).status_code == 200
    tamper(db, "UPDATE keys SET exportable = true")
    response = client.get("/keys/vault", headers=bearer(token))
    envelope(response, 500, "integrity_error")
    assert "dek" not in response.text
    envelope(call(client, token, "vault", "rotate", None), 500, "integrity_error")
    envelope(call(client, token, "vault", "encrypt", {"plaintext": ""}), 500, "integrity_error")


# DEKs kept by the server between requests (OPERATION_KEY_CACHE): never believed on their own

@pytest.mark.own_app(KEY_DELETION_WAIT=0)
def test_a_key_made_again_under_a_used_reference_gets_nothing_of_the_old_one(client, token, db):
    old = encrypt(client, token, b"old key", CONTEXT)["ciphertext"]
    assert unb64(decrypt(client, token, old, CONTEXT).json()["plaintext"]) == b"old key"  # its DEK is kept now
    assert client.delete("/keys/orders/actions/delete", headers=bearer(token)).status_code == 204
    assert generate(client, token, "orders").status_code == 200
    failed(decrypt(client, token, old, CONTEXT))
    new = encrypt(client, token, b"new key", CONTEXT)["ciphertext"]
    assert unb64(decrypt(client, token, new, CONTEXT).json()["plaintext"]) == b"new key"
    with db.cursor() as cur:  # one record per request, whichever way it went
        cur.execute("SELECT count(*) FROM audit_events WHERE action IN ('key.encrypt', 'key.decrypt')")
        assert cur.fetchone()[0] == 5


def test_a_rotation_by_another_server_process_is_seen_at_once(client, token, another_app):
    encrypt(client, token)  # this process keeps version 1 as current
    from tests.conftest import HttpClient, serve_in_thread, stop_server
    other = another_app()
    server, base_url = serve_in_thread(other, threads=2)
    try:
        with HttpClient(base_url) as elsewhere:
            assert call(elsewhere, token, "orders", "rotate", None).json()["version"] == 2
    finally:
        stop_server(server)
    assert encrypt(client, token)["version"] == 2
    assert call(client, token, "orders", "generate-data-key", {}).json()["version"] == 2


@pytest.mark.own_app(OPERATION_KEY_CACHE=0)
def test_without_kept_deks_every_operation_reads_its_key(client, token, db):
    sealed = encrypt(client, token, b"x", CONTEXT)
    assert unb64(decrypt(client, token, sealed["ciphertext"], CONTEXT).json()["plaintext"]) == b"x"
    failed(decrypt(client, token, sealed["ciphertext"], {}))
    assert call(client, token, "orders", "rotate", None).status_code == 200
    assert encrypt(client, token)["version"] == 2
    assert client.post("/keys/orders/actions/retire", json={"belowVersion": 2}, headers=bearer(token)).status_code == 200
    envelope(decrypt(client, token, sealed["ciphertext"], CONTEXT), 410, "version_retired")
    assert tamper(db, "SELECT count(*) FROM audit_events WHERE action LIKE 'key.%%crypt'")[0][0] == 5


def test_a_single_request_is_checked_field_by_field(client, token):
    headers = {**bearer(token), "Content-Type": "application/json"}
    envelope(client.post("/keys/orders/actions/encrypt", data="[1]", headers=headers), 400)
    body = envelope(call(client, token, "orders", "encrypt", {"plaintext": 1}), 400, "validation_failed")
    assert body["fields"] == {"plaintext": ["Not a string."]}
    body = envelope(call(client, token, "orders", "encrypt", {"plaintext": "", "admin": True}), 400,
                    "validation_failed")
    assert body["fields"] == {"admin": ["Unknown field."]}
    envelope(call(client, token, "orders", "encrypt", {}), 400, "validation_failed")
    envelope(call(client, token, "orders", "encrypt", {"plaintext": "", "context": {"a": 1}}), 400, "validation_failed")
    envelope(call(client, token, "orders", "encrypt", {"plaintext": "", "context": ["a"]}), 400, "validation_failed")
    envelope(call(client, token, "orders", "decrypt", {"ciphertext": None}), 400, "validation_failed")
    envelope(call(client, token, "orders", "reencrypt", {"ciphertext": "x", "toKeyReference": "no/such"}), 400,
             "validation_failed")
    envelope(call(client, token, "orders", "generate-data-key", {"plaintext": 0}), 400, "validation_failed")
    envelope(call(client, token, "orders", "encrypt", {"items": "all"}), 400, "validation_failed")
    envelope(call(client, token, "bad/ref", "encrypt", {"plaintext": ""}), 404)
    envelope(call(client, token, "b" * 65, "encrypt", {"plaintext": ""}), 400, "validation_failed")


def test_the_audit_chain_verifies_with_operation_records_unsealed_and_sealed(app, client, token):
    """An operation's record carries `detail` under its MAC: every reader of audit rows (verify of
    rows not sealed yet, the sealer, the stream) reads it, or a record the KMS wrote would look forged."""
    from kms.audit.service import seal_pending, verify_chain
    encrypt(client, token, context={"order": "7"})
    kms = app.extensions["kms"]
    with kms.pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM audit_events WHERE detail IS NOT NULL AND chain_pos IS NULL")
            assert cur.fetchone()[0] >= 1
        conn.rollback()
        unsealed = verify_chain(conn, kms)
        assert unsealed.ok, unsealed.problem
        seal_pending(conn, kms, wait=True)
        sealed = verify_chain(conn, kms)
        assert sealed.ok, sealed.problem


NOT_AN_OBJECT = {
    "a list": "[]",
    "a string": '"x"',
    "not JSON": '{"ciphertext": ',
    "empty": "",
    "deep nesting": "[" * 1000 + "]" * 1000,
    "5,000-digit number": '{"plaintext": ' + "9" * 5000 + "}",
    "a lone surrogate": '{"ciphertext": "\\ud800"}',
    "a UTF-8 byte order mark": '\ufeff{"ciphertext": "x"}',
    "invalid UTF-8": b'{"ciphertext": "\xff\xfe"}'.decode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(NOT_AN_OBJECT))
def test_a_body_that_is_not_a_json_object_gets_the_answer_any_route_gives(client, token, name):
    """The operations hand a JSON object to the service directly (kms.web.routing.json_object);
    anything else is parsed as every route parses its body, for the same answer."""
    text = NOT_AN_OBJECT[name]
    data = text.encode("latin-1") if name == "invalid UTF-8" else text.encode()
    headers = {**bearer(token), "Content-Type": "application/json"}
    expected = client.post("/keys/actions/generate", data=data, headers=headers)
    for action in ("encrypt", "decrypt", "reencrypt", "generate-data-key"):
        response = client.post(f"/keys/orders/actions/{action}", data=data, headers=headers)
        if action == "generate-data-key" and name == "empty":  # its body is optional
            assert response.status_code == 200, response.text
            continue
        body = envelope(response, 400, envelope(expected, 400)["error"])
        if name in ("a list", "a string"):  # JSON, but not the object each schema asks for
            assert body["fields"] == {"_schema": ["The body must be a JSON object."]}
        elif name == "empty":  # an empty object, as before: the service names the missing field
            assert body["fields"] in ({"plaintext": ["Missing data for required field."]},
                                      {"ciphertext": ["Missing data for required field."]})
        else:  # not loaded as JSON: the parser's answer, whatever the route
            assert (body["message"], body.get("fields")) == (expected.json()["message"], expected.json().get("fields"))


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.kms+json",
                                          "text/plain"])
def test_operations_take_every_json_content_type_and_no_other(client, token, content_type):
    data = json.dumps({"plaintext": b64(b"x")}).encode()
    response = client.post("/keys/orders/actions/encrypt", data=data,
                           headers={**bearer(token), "Content-Type": content_type})
    if content_type == "text/plain":
        envelope(response, 415, "unsupported_media_type")
    else:
        assert response.status_code == 200, response.text
