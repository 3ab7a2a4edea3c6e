"""Start Prefect's temporary API server early, so that its boot overlaps the imports of torch and MLflow.

Without ``PREFECT_API_URL``, Prefect 3 runs a flow against a temporary ("ephemeral") API server: a uvicorn
subprocess that Prefect starts when the flow is called. Before it can start it, Prefect imports
``prefect.server`` in the calling process (about 6 s on a 2-core machine), and the subprocess then needs
several more seconds to answer. Together that is most of a short run's start-up.

``start_temporary_api`` runs the same server, with the same command and environment as Prefect's own
``SubprocessASGIServer``, as soon as the CLI has validated its input, and points this process (and any
process it starts, such as Dask workers) at it through ``PREFECT_API_URL``. The server runs while this
process imports the flow, and it is stopped at exit as Prefect stops its own. Flow runs land in the same
database, under ``PREFECT_HOME``, as they would with Prefect's ephemeral mode.

Several commands started together (terminals opened at once on a fresh machine) would each start a server on
that one database, and each server creates or migrates it as it starts: two migrations at once on a new
sqlite file fail ("index ... already exists"). The servers of one ``PREFECT_HOME`` therefore start one after
the other, under a file lock held from a server's start until it answers (by then its migrations and block
registrations are done); a command waiting for the lock goes on loading the flow meanwhile. Each command
keeps its own server, so none depends on another command's lifetime.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Prefect marks its temporary server with these; the UI is not served (see prefect.server.api.server).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# Telemetry off for the temporary server, unless the user's environment says otherwise: its heartbeat
# (prefect.server.services.telemetry) writes to the same fresh sqlite database while the first flow run does,
# and fails with "database is locked" and a long traceback; offline, it logs "Failed to send telemetry" at
# ERROR on every run. Neither is anything the user can act on. PREFECT_SERVER_ANALYTICS_ENABLED=true turns it on.
QUIET_SERVER_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# The lock that orders start-ups in PREFECT_HOME, and how long a command waits for it, in start-up timeouts:
# each command ahead holds it for one start-up at most.
START_LOCK_NAME = ".deeprnn-temporary-server.lock"
LOCK_WAIT_STARTS = 6
STARTUP_FAILURE_EXIT_CODE = 3  # uvicorn's exit status when it cannot start, e.g. its port was taken meanwhile

_OWN_SERVER = "start a server with `prefect server start` and set PREFECT_API_URL"
_RAISE_OR_OWN = f"Raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or {_OWN_SERVER}"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


class PrefectAPIError(RuntimeError):
    """The temporary Prefect API server did not come up."""


def _port_taken(port: int) -> bool:
    """True when something on 127.0.0.1 listens on ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def server_command(port: int) -> list[str]:
    """The uvicorn command line Prefect's ``SubprocessASGIServer`` runs for its temporary server."""
    import prefect

    options = f"--factory prefect.server.api.server:create_app --host 127.0.0.1 --port {port} --log-level error"
    app_dir = str(prefect.__module_path__.parent)  # a folder name may hold spaces: one argument whatever it is
    return [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, *options.split(), "--lifespan", "on"]


@dataclass
class TemporaryAPI:
    """A temporary Prefect API server owned by this process: started at once, or as soon as the servers that
    other commands are starting on the same database answer (``lock``)."""

    env: dict[str, str] = field(repr=False)
    lock: Any  # a filelock.FileLock on PREFECT_HOME, held from this server's start until it answers
    timeout: float  # seconds to wait for it: Prefect's own setting for its ephemeral server
    process: subprocess.Popen[bytes] | None = None  # None while waiting for the lock
    port: int = 0
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False

    @property
    def url(self) -> str:
        """The API's base URL, as ``PREFECT_API_URL`` takes it."""
        return f"http://127.0.0.1:{self.port}/api"

    def try_start(self) -> bool:
        """Start the server if it has not started and the lock is free now (no waiting); True once started."""
        from filelock import Timeout  # a Prefect dependency, as filelock.FileLock

        if self.process is None:
            try:
                self.lock.acquire(blocking=False)
            except Timeout:
                return False
            except OSError:  # an unusable lock file: the servers start as they would without one
                pass
            self._spawn()
        return True

    def is_ready(self) -> bool:
        """True once the server answers its health check (one quick request, no waiting)."""
        if not self.ready and self.try_start():
            import httpx  # Prefect's own HTTP client; already loaded with prefect

            with contextlib.suppress(httpx.HTTPError):
                self.ready = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        return self.ready

    def starting(self) -> bool:
        """True while the server is still on its way up: not answering yet, waiting for its turn or running (on
        another port if another program took its port as it started), and within its timeout."""
        if self.is_ready():
            return False
        if self.process is None:
            return time.monotonic() < self.queued_at + self.timeout * LOCK_WAIT_STARTS
        if self.process.poll() == STARTUP_FAILURE_EXIT_CODE and _port_taken(self.port):
            self._spawn()  # another program took the port between our choosing and binding it: another port
        return self.process.poll() is None and time.monotonic() < self.started_at + self.timeout

    def wait(self) -> None:
        """Block until the server answers; raise ``PrefectAPIError`` saying why if it does not. The lock is
        released either way: the database is ready, or this server will not make it so. Its turn may take
        ``LOCK_WAIT_STARTS`` start-ups; its start is timed as Prefect times its own server's."""
        try:
            while self.starting():
                time.sleep(0.1)
            if self.ready:
                return
            if self.process is None:
                raise PrefectAPIError(
                    f"other commands have been starting Prefect's temporary API server on this PREFECT_HOME for "
                    f"{self.timeout * LOCK_WAIT_STARTS:.0f} s (lock file {self.lock.lock_file}). {_RAISE_OR_OWN}"
                )
            code = self.process.poll()
            if code is not None:
                raise PrefectAPIError(
                    f"Prefect's temporary API server exited with status {code} before answering (its errors are "
                    f"printed above). Check PREFECT_HOME's database, or {_OWN_SERVER}"
                )
            self.stop()
            raise PrefectAPIError(
                f"Prefect's temporary API server did not answer within {self.timeout:.0f} s. {_RAISE_OR_OWN}"
            )
        finally:
            self.lock.release(force=True)  # a no-op when it does not hold it

    def _spawn(self) -> None:
        """Start the server process on a free port, tied to this one's life where the platform allows it, and point
        this process (and its children) at it, with no UI link: the server has no UI.

        In a session (and process group) of its own: a terminal's Ctrl-C, and the SIGTERM that ``timeout``,
        ``docker stop`` or systemd send, reach the whole group of the command, and the server would die before
        the flow run reports how it stopped. The command stops it itself at exit (``TemporaryAPI.stop``), and the
        parent-death signal still ends it when the command is killed outright.
        """
        from prefect.context import refresh_global_settings_context

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a port nothing listens on right now
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        preexec = _stop_with_parent if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen(
            server_command(self.port), env=self.env, preexec_fn=preexec, start_new_session=True
        )
        self.started_at = time.monotonic()
        os.environ["PREFECT_API_URL"] = self.url
        os.environ["PREFECT_UI_URL"] = ""  # else Prefect would derive a link to a UI that this server does not serve
        refresh_global_settings_context()  # Prefect read its settings at import; let it see the variables above

    def stop(self) -> None:
        """Stop the server as Prefect stops its own: terminate, then kill after 5 s."""
        self.lock.release(force=True)  # a no-op when it does not hold it
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _stop_with_parent() -> None:
    # Runs in the server's process before it starts (Linux): SIGTERM to it when the command that started it
    # dies, also when that command is killed outright and its atexit hook never runs.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_temporary_api() -> TemporaryAPI | None:
    """Start Prefect's temporary API server now when Prefect would start one later; None when an API URL is
    configured (environment or profile) or ephemeral mode is off. The server is stopped at exit."""
    from filelock import FileLock
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    # The same environment Prefect gives its server: ours, its markers, then the active profile's settings.
    env = {**QUIET_SERVER_ENV, **os.environ, **SERVER_ENV, **settings.to_environment_variables(exclude_unset=True)}
    home = Path(settings.home)
    with contextlib.suppress(OSError):  # a folder that cannot be made: the server says what is wrong with it
        home.mkdir(parents=True, exist_ok=True)
    timeout = float(settings.server.ephemeral.startup_timeout_seconds)
    api = TemporaryAPI(env, FileLock(str(home / START_LOCK_NAME)), timeout)
    atexit.register(api.stop)
    api.try_start()  # now, unless another command's server is starting on the same database
    return api
