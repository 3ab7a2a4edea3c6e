"""A throwaway PostgreSQL server on 127.0.0.1 for tests: a fresh cluster in a temporary folder (``initdb``, run
as the ``postgres`` user when the tests run as root, since PostgreSQL refuses root), a user with a password
and an empty database, removed with its folder at the end. Tests that need it skip, saying why, where the
server programs are not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ports import free_port

USER, PASSWORD, DATABASE = "deeprnn", "s3cret-pw", "optuna"


def server_programs() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's newest version; ``None``."""
    found = shutil.which("initdb")
    folders = [Path(found).parent] if found else []
    folders += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
    for folder in folders:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def why_not() -> str | None:
    """Why no server can start here, or ``None`` when one can."""
    if server_programs() is None:
        return "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        return "running as root, PostgreSQL needs the postgres user and runuser"
    return None


def _no_user(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode != 0


@contextmanager
def postgres_database() -> Iterator[str]:
    """A running server with database ``optuna`` owned by user ``deeprnn``; yields its URL, password included
    (``postgresql://deeprnn:...@127.0.0.1:PORT/optuna``). The server and its folder go at the end."""
    programs = server_programs()
    assert programs is not None, why_not()
    # Under /tmp, not pytest's private folder: the postgres user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="deeprnn-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    (folder / "pw").write_text(PASSWORD + "\n")
    run = lambda *cmd: subprocess.run([*as_pg, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    try:
        run(
            str(programs / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(folder / "pw"), "-A", "scram-sha-256"
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(programs / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        url = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}"
        import psycopg

        with psycopg.connect(f"{url}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield f"{url}/{DATABASE}"
    finally:
        if (data / "postmaster.pid").exists():
            run(str(programs / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
