"""The SDK and `kms-client` with the server-side operations: one ciphertext format on both sides,
batches, data keys, keys that are not exportable, and files streamed under one data key."""
import base64
import json
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import ciphertext as server_format
from kms_client import BLOB_MAGIC, BlobError, Client, KmsError, ciphertext as sdk_format
from tests.conftest import CLIENT_PASSWORD, bearer
from tests.kms_client.test_command_line import run_cli


@pytest.fixture
def sdk(live_server, auth):
    kms = Client(base_url=live_server, clientname="ops-sdk")
    kms.signup(auth.signup_token("ops-sdk"), CLIENT_PASSWORD)
    kms.generate_key("files")
    return kms


CONTEXT = {"bucket": "invoices", "object": "2026/12/07.pdf"}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# One format on both sides

@pytest.mark.parametrize("context", [None, {}, CONTEXT, {"é": "ü", "": ""}])
def test_the_server_and_the_sdk_write_the_same_format(context):
    dek = os.urandom(32)
    by_server = server_format.seal(dek, 7, b"plaintext", context)
    by_sdk = sdk_format.seal(dek, 7, b"plaintext", context)
    assert by_server[:21] == by_sdk[:21]  # format, key id, version
    assert sdk_format.open_sealed(dek, by_server, context) == b"plaintext"
    assert server_format.open_sealed(dek, by_sdk, context) == b"plaintext"
    assert server_format.canonical_context(context) == sdk_format.canonical_context(context)
    with pytest.raises(server_format.DecryptionFailed):
        server_format.open_sealed(dek, by_sdk, {"other": "context"})


def test_what_the_sdk_encrypts_locally_the_server_decrypts(sdk, live_server, client):
    blob = sdk.encrypt("files", b"written here", CONTEXT, local=True)
    assert sdk.decrypt("files", blob, CONTEXT) == b"written here"  # by the server
    token = sdk._token_for_request()
    answer = client.post("/keys/files/actions/decrypt", json={"ciphertext": b64(blob), "context": CONTEXT},
                         headers=bearer(token))
    assert answer.status_code == 200 and answer.json()["plaintext"] == b64(b"written here")


def test_what_the_server_encrypts_the_sdk_decrypts_locally(sdk):
    blob = sdk.encrypt("files", b"written there", CONTEXT)
    assert sdk.decrypt("files", blob, CONTEXT, local=True) == b"written there"
    with pytest.raises(BlobError):
        sdk.decrypt("files", blob, {"bucket": "other"}, local=True)
    with pytest.raises(BlobError):
        sdk.decrypt("files", blob, {"bucket": "other"})


def test_the_earlier_sdks_aad_and_blobs_keep_working(sdk):
    blob = sdk.encrypt("files", b"card 4111", aad=b"invoice:42")
    assert sdk.decrypt("files", blob, {"aad": b64(b"invoice:42")}) == b"card 4111"  # it is that context
    assert sdk.decrypt("files", blob, aad=b"invoice:42", local=True) == b"card 4111"
    # a blob as the earlier SDK wrote it: "KMS1" | version | nonce | AES-GCM, header + aad as associated data
    key = sdk.get_key("files").encrypt_with
    header = BLOB_MAGIC + struct.pack(">I", key.version)
    nonce = os.urandom(12)
    legacy = header + nonce + AESGCM(key.dek).encrypt(nonce, b"old blob", header + b"invoice:42")
    assert sdk.decrypt("files", legacy, aad=b"invoice:42") == b"old blob"
    with pytest.raises(BlobError):
        sdk.decrypt("files", legacy, aad=b"invoice:43")


def test_reencrypt_and_data_keys(sdk):
    sdk.generate_key("archive")
    blob = sdk.encrypt("files", b"move", CONTEXT)
    moved = sdk.reencrypt("files", blob, CONTEXT, to_reference="archive", to_context={"tier": "cold"})
    assert sdk.decrypt("archive", moved, {"tier": "cold"}) == b"move"
    data_key = sdk.generate_data_key("files", CONTEXT)
    assert len(data_key.plaintext) == 32 and "plaintext" not in repr(data_key)
    assert sdk.decrypt("files", data_key.ciphertext, CONTEXT) == data_key.plaintext
    assert sdk.generate_data_key("files", plaintext=False).plaintext is None


def test_batches_larger_than_one_request_keep_their_order_and_errors(sdk):
    plaintexts = [os.urandom(n % 50) for n in range(250)]
    blobs = sdk.encrypt_batch("files", [(p, {"n": str(n)}) for n, p in enumerate(plaintexts)])
    assert len(blobs) == 250 and all(isinstance(blob, bytes) for blob in blobs)
    items = [(blob, {"n": str(n)}) for n, blob in enumerate(blobs)]
    items[3] = (blobs[3], {"n": "wrong"})
    answers = sdk.decrypt_batch("files", items)
    assert isinstance(answers[3], KmsError) and answers[3].code == "decryption_failed" and answers[3].status == 400
    assert [a for n, a in enumerate(answers) if n != 3] == [p for n, p in enumerate(plaintexts) if n != 3]
    keys = sdk.generate_data_key_batch("files", [None, CONTEXT])
    assert sdk.decrypt_batch("files", [keys[0].ciphertext, (keys[1].ciphertext, CONTEXT)]) == [k.plaintext
                                                                                                for k in keys]
    moved = sdk.reencrypt_batch("files", items[:2])
    assert isinstance(moved[0], bytes) and sdk.decrypt("files", moved[1], {"n": "1"}) == plaintexts[1]


def test_a_key_that_is_not_exportable_is_used_only_on_the_server(sdk):
    assert sdk.generate_key("sealed", exportable=False) is None
    with pytest.raises(KmsError) as refused:
        sdk.encrypt("sealed", b"x", local=True)
    assert refused.value.status == 409 and refused.value.code == "not_exportable"
    assert sdk.rotate_key("sealed") is None
    blob = sdk.encrypt("sealed", b"inside", CONTEXT)
    assert sdk.decrypt("sealed", blob, CONTEXT) == b"inside"
    with pytest.raises(KmsError):
        sdk.decrypt("sealed", blob, CONTEXT, local=True)
    assert sdk.set_exportable("files", False)["exportable"] is False
    with pytest.raises(KmsError) as refused:
        sdk.get_key("files")
    assert refused.value.code == "not_exportable"


# Files streamed under one data key

def cli(live_server, *args, stdin=b""):
    return run_cli(live_server, *args, stdin=stdin, user="ops-sdk")


CHUNK = 64 * 1024
TAG = 16


def chunks_start(sealed: bytes) -> int:
    (length,) = struct.unpack(">H", sealed[16:18])
    return 18 + length


def test_a_large_file_streams_through_one_data_key(sdk, live_server, db):
    data = os.urandom(3 * CHUNK + 123)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'key.generate_data_key'")
        before = cur.fetchone()[0]
    sealed = cli(live_server, "encrypt", "--ref", "files", "--context", "bucket=invoices", stdin=data)
    assert sealed.returncode == 0, sealed.stderr
    out = sealed.stdout
    assert out[:4] == b"KMSF" and data[:64] not in out
    assert len(out) == chunks_start(out) + len(data) + 4 * TAG  # three full chunks and a short last one
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'key.generate_data_key'")
        assert cur.fetchone()[0] == before + 1  # one data key for the whole file
    opened = cli(live_server, "decrypt", "--ref", "files", "--context", "bucket=invoices", stdin=out)
    assert opened.returncode == 0 and opened.stdout == data
    wrong = cli(live_server, "decrypt", "--ref", "files", "--context", "bucket=other", stdin=out)
    assert wrong.returncode == 4 and wrong.stdout == b""


def test_an_exact_number_of_chunks_and_an_empty_file_round_trip(sdk, live_server):
    for data in (b"", os.urandom(2 * CHUNK)):
        sealed = cli(live_server, "encrypt", "files", stdin=data).stdout
        assert cli(live_server, "decrypt", "files", stdin=sealed).stdout == data


@pytest.mark.parametrize("damage", ["cut at a chunk boundary", "cut inside a chunk", "last chunk dropped",
                                    "chunks swapped", "a chunk repeated", "a byte flipped", "header changed",
                                    "trailing bytes"])
def test_truncation_reordering_and_alteration_are_detected(sdk, live_server, damage):
    data = os.urandom(3 * CHUNK + 10)
    sealed = cli(live_server, "encrypt", "files", stdin=data).stdout
    start = chunks_start(sealed)
    full = CHUNK + TAG
    chunks = [sealed[start + n * full:start + (n + 1) * full] for n in range(4)]
    head = sealed[:start]
    damaged = {
        "cut at a chunk boundary": head + b"".join(chunks[:3]),
        "cut inside a chunk": sealed[:-5],
        "last chunk dropped": head + b"".join(chunks[:3]),
        "chunks swapped": head + chunks[1] + chunks[0] + chunks[2] + chunks[3],
        "a chunk repeated": head + chunks[0] + chunks[0] + chunks[2] + chunks[3],
        "a byte flipped": sealed[:start + 100] + bytes([sealed[start + 100] ^ 1]) + sealed[start + 101:],
        "header changed": sealed[:6] + bytes([sealed[6] ^ 1]) + sealed[7:],
        "trailing bytes": sealed + b"\x00",
    }[damage]
    opened = cli(live_server, "decrypt", "files", stdin=damaged)
    assert opened.returncode in (2, 4), opened.stderr  # 2: not a stream at all (its chunk size changed)
    assert opened.returncode == 4 or damage == "header changed"
    assert opened.stdout != data and opened.stderr.count(b"\n") == 1


def test_reencrypt_moves_a_files_data_key_without_touching_its_chunks(sdk, live_server):
    data = os.urandom(CHUNK + 1)
    sealed = cli(live_server, "encrypt", "files", stdin=data).stdout
    sdk.rotate_key("files")
    sdk.generate_key("archive")
    moved = cli(live_server, "reencrypt", "files", "--to-ref", "archive", "--to-context", "tier=cold", stdin=sealed)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout[chunks_start(moved.stdout):] == sealed[chunks_start(sealed):]
    assert cli(live_server, "decrypt", "archive", "--context", "tier=cold", stdin=moved.stdout).stdout == data
    assert cli(live_server, "decrypt", "files", stdin=moved.stdout).returncode == 4


def test_values_line_by_line_and_data_keys_from_the_shell(sdk, live_server):
    values = [os.urandom(n) for n in (1, 10, 100)]
    sealed = cli(live_server, "encrypt", "files", "--lines", "--context", "a=b",
                 stdin="".join(b64(v) + "\n" for v in values).encode())
    assert sealed.returncode == 0, sealed.stderr
    lines = sealed.stdout.decode().splitlines()
    assert len(lines) == 3
    lines[1] = lines[0][:-4] + ("AAAA" if lines[0][-4:] != "AAAA" else "BBBB")
    opened = cli(live_server, "decrypt", "files", "--lines", "--context", "a=b", stdin="\n".join(lines).encode())
    assert opened.returncode == 1 and b"line 2: decryption_failed" in opened.stderr
    assert opened.stdout.decode().splitlines() == [b64(values[0]), "", b64(values[2])]
    data_key = cli(live_server, "data-key", "files", "--context", "a=b")
    body = json.loads(data_key.stdout)
    assert set(body) == {"ciphertext", "version", "plaintext"}
    wrapped = cli(live_server, "data-key", "files", "--no-plaintext")
    assert set(json.loads(wrapped.stdout)) == {"ciphertext", "version"}
    made = cli(live_server, "generate", "--ref", "cli-sealed", "--not-exportable")
    assert json.loads(made.stdout) == {"version": 1, "exportable": False}
    assert cli(live_server, "get", "cli-sealed").returncode == 1
