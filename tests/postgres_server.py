"""A throwaway PostgreSQL server on 127.0.0.1 for tests: a fresh cluster in a temporary folder (``initdb``, run
as the ``postgres`` user when the tests run as root, since PostgreSQL refuses root), removed with its folder at
the end. Its superuser ``postgres`` connects without a password through the cluster's own socket only; TCP on
127.0.0.1 asks every user for a password (scram-sha-256). Tests add the users and databases they need with
:meth:`PostgresServer.add_database`. Modules that need a server mark themselves with :data:`needs_postgres`,
which skips them, with one reason, where the server programs are not installed. The start is kept cheap, at
the cost of durability nothing here needs: no sync after ``initdb``, ``fsync`` off."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from ports import free_port

PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_dump")


def server_programs() -> Path | None:
    """The folder holding initdb, pg_ctl, postgres and pg_dump: that of PATH's ``initdb`` (links followed, so
    a lone link to ``initdb`` finds its siblings), else Debian's newest version; ``None`` when there is none."""
    found = shutil.which("initdb")
    folders = [Path(found).resolve().parent] if found else []
    folders += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True)
    for folder in folders:
        if all((folder / name).is_file() for name in PROGRAMS):
            return folder
    return None


def _version(name: str) -> tuple[int, ...]:
    """Debian's version folder as numbers, so 10 sorts after 9."""
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def why_not() -> str | None:
    """Why no server can start here, or ``None`` when one can."""
    if server_programs() is None:
        return "PostgreSQL's server programs (initdb, pg_ctl, postgres, pg_dump) are not installed"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        return "running as root, PostgreSQL needs the postgres user and runuser"
    return None


def _no_user(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode != 0


needs_postgres = pytest.mark.skipif(why_not() is not None, reason=f"no PostgreSQL server can start here: {why_not()}")


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster: its folder (which also holds its socket), its TCP port and its programs' folder."""

    folder: Path
    port: int
    programs: Path

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """``statement`` run as the superuser in ``database`` (autocommit); the rows it returns, if any."""
        import psycopg

        with psycopg.connect(**self._superuser(database), autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def add_database(self, name: str, user: str, password: str, driver: str | None = None) -> str:
        """A new user with ``password`` (one TCP connections must give) owning a new database ``name``; the
        database's URL, password included (see :meth:`url`)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self._superuser("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user), password))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(user)))
        return self.url(user, password, name, driver)

    def url(self, user: str, password: str, database: str, driver: str | None = None) -> str:
        """``postgresql://user:password@127.0.0.1:PORT/database``, or ``postgresql+DRIVER://...`` with a driver."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def dump(self, database: str) -> str:
        """The whole of ``database`` (schema and rows) as SQL text, read by ``pg_dump`` as the superuser."""
        command = [str(self.programs / "pg_dump"), "-h", str(self.folder), "-p", str(self.port), "-U", "postgres"]
        done = subprocess.run([*command, database], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"pg_dump {database}: {done.stderr}"
        return done.stdout

    def _superuser(self, database: str) -> dict[str, Any]:
        return {"host": str(self.folder), "port": self.port, "user": "postgres", "dbname": database}


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh cluster with only its superuser, running until the block ends; then stopped and deleted."""
    programs = server_programs()
    assert programs is not None, why_not()
    # Under the system's temporary folder, not pytest's: those are closed to the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="deeprnn-pg-"))
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_owner:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()

    def run(program: str, *args: str) -> None:
        # cwd: the postgres user may not enter the tests' working folder.
        command = [*as_owner, str(programs / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=folder)
        assert done.returncode == 0, f"{program}: {done.stdout}{done.stderr}"

    try:
        auth = ["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]
        run("initdb", "-D", str(data), *auth)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
        yield PostgresServer(folder, port, programs)
    finally:
        if (data / "postmaster.pid").exists():
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
