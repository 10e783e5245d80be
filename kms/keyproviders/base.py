"""What every KEK provider offers."""
import hashlib


def key_check_value(key: bytes) -> bytes:
    """A fingerprint to recognise a key (a secret, or a KEK held in memory) at start-up; reveals
    nothing usable about a 256-bit key."""
    return hashlib.sha256(b"kms-key-check-v1\x00" + key).digest()


class KekUnavailable(Exception):
    """The KEK's keeper (an HSM) does not answer right now: a 503, like a database outage."""


class Kek:
    """A key encryption key: AES-256-GCM seal and open with a caller-chosen nonce. Subclasses
    never expose key material."""

    provider = "?"

    def encrypt(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        """Ciphertext followed by the 16-byte tag."""
        raise NotImplementedError

    def decrypt(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        """Raises cryptography.exceptions.InvalidTag when the ciphertext fails authentication."""
        raise NotImplementedError

    def check_value(self) -> bytes:
        """A fingerprint that recognises this key at start-up without revealing it: the seal of a
        fixed message under a fixed nonce that no other seal uses (nonces are otherwise random)."""
        return hashlib.sha256(b"kms-kek-check-v2\x00" + self.encrypt(b"\x00" * 12, b"kms-kek-check", b"")).digest()

    def describe(self) -> str:
        return self.provider
