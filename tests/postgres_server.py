"""A private PostgreSQL server for tests: initdb + pg_ctl in a temp dir on a free local port.

Import the fixture into a test module: ``from postgres_server import postgres_url``.
CI installs the server with apt (package ``postgresql``) and the driver with pip
(``psycopg2-binary``); a missing piece fails the test loudly instead of skipping it.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

# the databases a test can run on, for a fixture's params; the PostgreSQL one starts a server
BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgres))


def _server_bin_dir() -> Path:
    # Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin.
    found = shutil.which("pg_ctl") or max(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), default=None)
    if found is None:
        pytest.fail("PostgreSQL server not found (pg_ctl): apt-get install -y postgresql")
    return Path(found).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("psycopg2 missing: pip install psycopg2-binary (the 'test' extra)")
    bin_dir = _server_bin_dir()
    # The server refuses to run as root; run it as the 'postgres' user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="digitnet-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)

    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
