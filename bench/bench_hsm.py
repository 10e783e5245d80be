"""Look-ups with a KEK in an HSM (SoftHSM2 here) against the same look-ups with an environment KEK,
side by side in alternating rounds (each server with its own database): with the HSM's DEK cache
(HSM_DEK_CACHE, the default: a DEK unwrapped in the token is kept for 60 s) and without it.

Every look-up unwraps two DEKs (decryptWith version 1, encryptWith version 2); with a PKCS#11 KEK
and no cache both unwraps happen inside the token.

    python bench/bench_hsm.py           (needs wrk and the Debian package softhsm2;
                                         BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS)
"""
import glob
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_keys import ROUNDS, SECONDS, THREADS, alternate, lookups, rounds  # noqa: E402
from bench.common import ROOT, bench_database, free_port, kms_env, kms_with_key, require_wrk, row  # noqa: E402

PIN = "bench-pin-1234"


@contextmanager
def softhsm_token():
    module = next(iter(glob.glob("/usr/lib/softhsm/libsofthsm2.so") + glob.glob("/usr/lib/*/softhsm/libsofthsm2.so")),
                  None)
    if module is None:
        sys.exit("SoftHSM2 is needed: apt-get install softhsm2")
    with tempfile.TemporaryDirectory(prefix="kms-softhsm-") as directory:
        os.mkdir(f"{directory}/tokens")
        conf = f"{directory}/softhsm2.conf"
        Path(conf).write_text(f"directories.tokendir = {directory}/tokens\nobjectstore.backend = file\n")
        env = {"SOFTHSM2_CONF": conf, "PKCS11_MODULE": module, "PKCS11_PIN": PIN}
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", "0000"],
                       check=True, capture_output=True, env={**os.environ, **env})
        yield env


@contextmanager
def kms(database_url: str, **settings):
    port = free_port()
    env = kms_env(database_url, port, THREADS, **settings)
    if "KEK_2" in settings:  # make the token's key first, with the server's own settings
        subprocess.run([sys.executable, "-m", "flask", "--app", "app", "kms", "kek", "generate", "--pkcs11",
                        settings["KEK_2"]], cwd=ROOT, env={**env, "KEK_2": ""}, check=True, capture_output=True)
    with kms_with_key(env, port) as server:
        yield server


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {THREADS} server threads, {ROUNDS} alternating rounds; SoftHSM2 in-process",
          flush=True)
    with ExitStack() as stack:
        hsm = stack.enter_context(softhsm_token())
        cached = stack.enter_context(kms(stack.enter_context(bench_database()), **hsm,
                                         KEK_2="pkcs11:token=bench;object=kek-2"))
        uncached = stack.enter_context(kms(stack.enter_context(bench_database()), **hsm, HSM_DEK_CACHE=0,
                                           KEK_2="pkcs11:token=bench;object=kek-3"))
        in_env = stack.enter_context(kms(stack.enter_context(bench_database())))
        for label, server, concurrencies in (("HSM KEK, DEK cache 60 s", cached, (16, 64)),
                                             ("HSM KEK, no DEK cache", uncached, (16, 64))):
            for connections in concurrencies:
                hsm_run, env_run, ratio, ratios = alternate(lambda c: lookups(server, c),
                                                            lambda c: lookups(in_env, c), connections)
                print(row(f"lookup, {label}  c={connections}", hsm_run), flush=True)
                print(row(f"lookup, environment KEK  c={connections}", env_run) +
                      f"   HSM / environment = {ratio:.2f}x ({rounds(ratios)})", flush=True)


if __name__ == "__main__":
    main()
