"""Opening the configured KEKs at start-up: each provider's key loaded and checked."""
import os

from cryptography.exceptions import InvalidTag

from kms.config import ConfigError, kek_variable
from kms.keyproviders.base import KekUnavailable
from kms.keyproviders.environment import EnvironmentKek
from kms.keyproviders.pkcs11 import Pkcs11Kek, Pkcs11Module


def open_keks(settings) -> dict:
    """The configured KEK versions as providers, each checked: a token KEK must load, log in,
    exist as a sensitive, non-extractable AES-256 key and pass a canary seal and open. A failure
    is one ConfigError naming the setting, never the PIN."""
    keks, module = {}, None
    for version, spec in sorted(settings.keks.items()):
        if isinstance(spec, bytes):
            keks[version] = EnvironmentKek(spec)
            continue
        variable = kek_variable(version)
        if module is None:
            module = load_module(settings)
        kek = Pkcs11Kek(module, spec)
        pkcs11 = module._pkcs11
        try:
            problems = kek.problems()
        except pkcs11.PinIncorrect:
            raise ConfigError("PKCS11_PIN", "was refused by the token") from None
        except pkcs11.NoSuchToken:
            raise ConfigError(variable, f"names token {spec.token!r}, which is not there") from None
        except pkcs11.NoSuchKey:
            raise ConfigError(variable, f"names no AES secret key labelled {spec.object!r} in the token") from None
        except pkcs11.MultipleObjectsReturned:
            raise ConfigError(variable, f"names more than one key labelled {spec.object!r}") from None
        except pkcs11.PKCS11Error as error:
            raise ConfigError(variable, f"cannot be used ({type(error).__name__})") from None
        if problems:
            raise ConfigError(variable, "names a key that " + " and ".join(problems))
        nonce, canary = os.urandom(12), os.urandom(32)
        try:
            if kek.decrypt(nonce, kek.encrypt(nonce, canary, b"kms-canary"), b"kms-canary") != canary:
                raise ConfigError(variable, "failed a test seal and open in the token")
        except (KekUnavailable, InvalidTag):
            raise ConfigError(variable, "failed a test seal and open in the token") from None
        keks[version] = kek
    return keks


_modules: dict = {}  # (path, PIN) -> the process's one Pkcs11Module for it


def load_module(settings):
    """The process's Pkcs11Module for PKCS11_MODULE (a PKCS#11 library is initialised, and a
    token logged in to, once per process)."""
    key = (settings.pkcs11_module, settings.pkcs11_pin)
    if key in _modules:
        return _modules[key]
    try:
        module = _modules[key] = Pkcs11Module(settings.pkcs11_module, settings.pkcs11_pin)
        return module
    except ImportError:
        raise ConfigError("PKCS11_MODULE", "needs python-pkcs11: pip install python-pkcs11") from None
    except Exception as error:  # noqa: BLE001 - whatever the library says, one line
        raise ConfigError("PKCS11_MODULE", f"cannot be loaded ({type(error).__name__})") from None
