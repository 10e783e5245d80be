"""A deployment of the original Go KMS to import, built per test in a database of its own."""
import pytest

from tests.importing.original_format import OriginalDeployment

# Its clients, their passwords and roles, and the keys each had: reference -> number of versions.
CLIENTS = {
    "billing-svc": ("Billing-passw0rd!", "client", {"invoices-db": 3, "ledger": 1}),
    "Orders-Svc": ("Orders-passw0rd!x", "client", {"orders-db": 2, "invoices-db": 1}),
    "ops-admin": ("Ops-admin-passw0rd", "admin", {}),
}


@pytest.fixture
def seed(new_database):
    """An empty original deployment."""
    deployment = OriginalDeployment(new_database())
    yield deployment
    deployment.close()


@pytest.fixture
def populated(seed):
    """The original deployment of CLIENTS, its keys rotated to their versions."""
    for name, (password, role, keys) in CLIENTS.items():
        seed.sign_up(name, password, role)
        for reference, versions in keys.items():
            seed.generate(name, reference)
            for _ in range(versions - 1):
                seed.rotate(name, reference)
    return seed


@pytest.fixture
def seed_env(seed, tmp_path):
    return seed.write_env(tmp_path / "original.env")


@pytest.fixture
def import_seed(runner, seed, seed_env):
    """Run `kms import-seed` from the original deployment into the test's KMS."""
    def run(*options, env=None):
        return runner.invoke(args=["kms", "import-seed", "--from", seed.url, "--seed-env", str(env or seed_env),
                                   *options])
    return run
