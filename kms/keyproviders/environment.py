"""A KEK given as 32 bytes in the environment (KEK, KEK_2, ...): held in the process's memory."""

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.keyproviders.base import Kek, key_check_value


class EnvironmentKek(Kek):
    provider = "environment"

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self._check = key_check_value(key)  # as for the other secrets, and as before providers existed

    def check_value(self) -> bytes:
        return self._check

    def __repr__(self):
        return "EnvironmentKek()"

    def encrypt(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext, associated_data)
