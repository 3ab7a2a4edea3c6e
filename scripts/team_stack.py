"""A team's stack on this machine, on 127.0.0.1: one PostgreSQL server with a database each for Prefect, MLflow and
Optuna, a Prefect server and an MLflow server (proxied artifacts) on it, and process workers that each start in
their own empty folder and share nothing with the deploying folder but the servers' URLs.

    python scripts/team_stack.py up --dir .team --workers 2 --deploy
    source .team/team.env            # PREFECT_API_URL, MLFLOW_TRACKING_URI, DEEPRNN_OPTUNA_STORAGE
    python scripts/team_stack.py status --dir .team
    python scripts/team_stack.py down --dir .team [--purge]

The stack folder holds ``stack.json`` (ports, process groups, the database password: mode 0600), ``team.env``,
``logs/``, ``artifacts/`` (the MLflow server's artifact store), ``workers/<name>/`` and the PostgreSQL data in
``postgres/``. Run as root, PostgreSQL runs as the ``postgres`` user; when that user cannot reach the stack folder,
its data goes to a fresh ``/tmp/deeprnn-pg-*`` folder instead (``down --purge`` removes it).

The Python API, for tests and fault drills (every function but ``up`` and ``down`` takes the ``Stack``):

    up(root, workers=0, deploy_all=False, scheduler=True) -> Stack start everything, wait for both servers
    down(root, purge=False) -> None                                stop workers, servers, PostgreSQL; safe twice
    Stack.load(root) -> Stack                                      the stack recorded in root/stack.json
    status(stack) -> dict[str, bool]                               component -> running
    deploy(stack)                                                  work pool, `prefect deploy --all`, setup-server
    restart_postgres(stack)                                        pg_ctl restart -m fast
    stop_mlflow(stack) / start_mlflow(stack)                       the MLflow server down / up again
    start_worker(stack, name) / kill_worker(stack, name)           a worker up / SIGKILL to it and its flow runs
    stop_worker(stack, name)                                       SIGTERM to it and its flow runs

Every server and worker runs in its own process group, so one signal stops it with its children.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
DATABASES = ("prefect", "mlflow", "optuna")
ROLE = "deeprnn"
POOL = "deeprnn-process"  # prefect.yaml's work pool
COMPONENTS = ("postgres", "prefect", "mlflow", "worker")
PREFECT_DRIVER = "postgresql+asyncpg"  # Prefect's server is async: asyncpg
MLFLOW_DRIVER = "postgresql"  # SQLAlchemy 2.1 reads postgresql:// as psycopg 3 (MLflow's store, Optuna's storage)
MLFLOW_ARTIFACT_FLAGS = ("--serve-artifacts", "--artifacts-destination")
# What a worker's environment keeps of the caller's, besides the servers' URLs and its own folders.
WORKER_BASICS = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",  # torch's threads per flow run, where a machine runs several at once
    "PREFECT_WORKER_QUERY_SECONDS",  # how often a worker asks the server for runs (Prefect's default: 10 s)
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)
# Uvicorn processes of the MLflow server: one serves a team's training runs (requests run in its thread pool).
MLFLOW_WORKERS = 1
IDLE_WORKER_GRACE = 5.0  # seconds an idle worker gets to stop before SIGKILL
START_TIMEOUT = 240.0  # seconds for a server to answer: generous, a loaded machine starts them slowly
STATE = "stack.json"
ENV_FILE = "team.env"
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # processes this Python process started, reaped when stopped


class StackError(Exception):
    """A stack that cannot start or be found: one line for the user, no traceback."""


@dataclass
class Stack:
    """A stack as recorded in ``root/stack.json``: its ports, password and process groups."""

    root: Path
    password: str  # the deeprnn role's, which owns the three databases
    admin_password: str  # the PostgreSQL superuser's (``postgres``)
    pg_bin: str
    pg_folder: str  # holds data/ and postgres.log
    pg_port: int
    prefect_port: int
    mlflow_port: int
    scheduler: bool = True
    pids: dict[str, int] = field(default_factory=dict)  # "prefect", "mlflow", "worker:NAME" -> process group

    @classmethod
    def load(cls, root: Path) -> Stack:
        """The stack recorded in ``root``; StackError when there is none."""
        path = Path(root) / STATE
        if not path.is_file():
            raise StackError(f"no stack in {root}: start one with `python scripts/team_stack.py up --dir {root}`")
        data = json.loads(path.read_text())
        return cls(**{**data, "root": Path(root).resolve()})

    def save(self) -> None:
        """Write ``stack.json`` and ``team.env`` (both 0600: they hold the password)."""
        data = {**asdict(self), "root": str(self.root)}
        env = "".join(f"export {k}='{v}'\n" for k, v in self.team_env().items())
        for name, text in ((STATE, json.dumps(data, indent=2)), (ENV_FILE, env)):
            path = self.root / name
            path.touch(mode=0o600)
            path.write_text(text)

    def database_url(self, name: str, driver: str = MLFLOW_DRIVER, masked: bool = False) -> str:
        """The URL of one of the three databases, as the deeprnn role; ``masked`` shows the password as ***."""
        password = "***" if masked else self.password
        return f"{driver}://{ROLE}:{password}@127.0.0.1:{self.pg_port}/{name}"

    @property
    def prefect_api_url(self) -> str:
        """The Prefect server's API (its dashboard is the same address without /api)."""
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        """The MLflow tracking server (UI, tracking API and proxied artifacts)."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def workers(self) -> list[str]:
        """The names of the workers started and not stopped."""
        return [key.split(":", 1)[1] for key in self.pids if key.startswith("worker:")]

    def team_env(self) -> dict[str, str]:
        """What a client or worker needs to use the stack: the two servers and the Optuna storage."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "DEEPRNN_OPTUNA_STORAGE": self.database_url("optuna"),
        }

    def log(self, name: str) -> Path:
        """The log file of a component: ``prefect``, ``mlflow`` or a worker's name."""
        return self.root / "logs" / f"{name}.log"


# ---- processes ----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``; zombies this process started are reaped."""
    child = _CHILDREN.get(pgid)
    if child is not None:
        child.poll()
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (a worker's flow runs start their own sessions, so its group misses them)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def component_members(stack: Stack, key: str) -> list[int]:
    """The live processes of component ``key`` ("prefect", "mlflow", "worker:NAME"): its process group's, when
    that group still runs the component's program (after a reboot its number may belong to another one)."""
    members = group_members(stack.pids[key]) if key in stack.pids else []
    program = b"mlflow" if key == "mlflow" else b"prefect"
    for pid in members:
        with contextlib.suppress(OSError):
            if program in Path(f"/proc/{pid}/cmdline").read_bytes():
                return members
    return []


def _stop_component(stack: Stack, key: str, first: signal.Signals = signal.SIGTERM, grace: float = 30.0) -> None:
    if component_members(stack, key):
        stop_group(stack.pids[key], first, grace)
    stack.pids.pop(key, None)
    stack.save()


def stop_group(pgid: int, first: signal.Signals = signal.SIGTERM, grace: float = 30.0) -> None:
    """Signal process group ``pgid`` (``first``, then SIGKILL after ``grace`` s) until none of it is left."""
    deadline = time.monotonic() + grace
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, first)
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    while group_members(pgid) and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    _CHILDREN.pop(pgid, None)


def _spawn(stack: Stack, key: str, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start ``cmd`` in its own process group, output to its log; record it as ``key`` in stack.json."""
    with open(stack.log(key.split(":")[-1]), "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    stack.pids[key] = proc.pid
    stack.save()
    return proc.pid


def _wait_healthy(stack: Stack, key: str, url: str, timeout: float = START_TIMEOUT) -> None:
    """Poll ``url`` until it answers 200; StackError with the log's end if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not component_members(stack, key):
            tail = stack.log(key.split(":")[-1]).read_text(errors="replace")[-3000:]
            raise StackError(f"{key} exited before answering {url}; its log ends:\n{tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.5)
    raise StackError(f"{key} did not answer {url} within {timeout:.0f} s (log: {stack.log(key.split(':')[-1])})")


# ---- PostgreSQL ---------------------------------------------------------------------------------------------


def find_postgres(debian: Path = Path("/usr/lib/postgresql")) -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl, postgres, psql): PATH's, else the newest
    version's in ``debian`` (Debian keeps them off PATH, in /usr/lib/postgresql/VERSION/bin)."""
    found = shutil.which("initdb")
    folders = [Path(found).resolve().parent] if found else []
    versions = [p for p in debian.glob("*/bin") if p.parent.name.isdigit()]
    by_version = sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in folders + by_version:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return folder
    raise StackError("PostgreSQL is not installed: install Debian's postgresql package (apt-get install -y postgresql)")


def _as_pg_user(cmd: list[str]) -> list[str]:
    """``cmd`` as the user PostgreSQL runs as: ``postgres`` under root (initdb refuses root), else oneself."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_folder(root: Path) -> Path:
    """A folder for PostgreSQL's data that its user owns and can reach."""
    if os.geteuid() != 0:
        (root / "postgres").mkdir(mode=0o700, exist_ok=True)
        return root / "postgres"
    if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
        raise StackError("run as root, PostgreSQL needs the `postgres` user and runuser (Debian's postgresql package)")
    # postgres must traverse every folder above its data; a private parent (e.g. mode 0700) sends it to /tmp.
    reachable = subprocess.run(_as_pg_user(["test", "-x", str(root), "-a", "-w", str(root)]), capture_output=True)
    folder = root / "postgres" if reachable.returncode == 0 else Path(tempfile.mkdtemp(prefix="deeprnn-pg-"))
    folder.mkdir(mode=0o700, exist_ok=True)
    shutil.chown(folder, "postgres", "postgres")
    return folder


def _pg_ctl(stack: Stack, *args: str) -> None:
    data = Path(stack.pg_folder) / "data"
    log = Path(stack.pg_folder) / "postgres.log"
    cmd = _as_pg_user([str(Path(stack.pg_bin) / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", *args])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if done.returncode:
        raise StackError(f"pg_ctl {args[-1]} failed: {done.stdout}{done.stderr}".strip())


def _psql(stack: Stack, sql: str) -> None:
    env = {**os.environ, "PGPASSWORD": stack.admin_password}
    cmd = [str(Path(stack.pg_bin) / "psql"), "-h", "127.0.0.1", "-p", str(stack.pg_port), "-U", "postgres"]
    done = subprocess.run([*cmd, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql], env=env, capture_output=True)
    if done.returncode:
        raise StackError(f"psql failed: {done.stderr.decode(errors='replace').strip()}")


def init_postgres(stack: Stack) -> None:
    """initdb (passwords required, TCP on 127.0.0.1 only), start, then the role and its three databases."""
    folder = Path(stack.pg_folder)
    pwfile = folder / "superuser-password"
    pwfile.write_text(stack.admin_password + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    initdb = [str(Path(stack.pg_bin) / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "-E", "UTF8"]
    auth = ["--locale=C", "--auth=scram-sha-256", f"--pwfile={pwfile}"]
    done = subprocess.run(_as_pg_user([*initdb, *auth]), capture_output=True, text=True, cwd="/")
    pwfile.unlink()
    if done.returncode:
        raise StackError(f"initdb failed: {done.stdout}{done.stderr}".strip())
    # No Unix socket (nothing to collide with another cluster's): TCP on 127.0.0.1, a password for every login.
    settings = f"\nlisten_addresses = '127.0.0.1'\nport = {stack.pg_port}\nunix_socket_directories = ''\n"
    with open(folder / "data" / "postgresql.conf", "a") as conf:
        conf.write(settings + "max_connections = 200\n")
    _pg_ctl(stack, "start")
    _psql(stack, f"CREATE ROLE {ROLE} LOGIN PASSWORD '{stack.password}'")
    for name in DATABASES:
        _psql(stack, f"CREATE DATABASE {name} OWNER {ROLE}")


def restart_postgres(stack: Stack) -> None:
    """Restart PostgreSQL (fast shutdown: open connections are cut), waiting until it accepts connections again."""
    _pg_ctl(stack, "-m", "fast", "restart")


def postgres_running(stack: Stack) -> bool:
    """Whether the stack's PostgreSQL server is running (its postmaster.pid names a live process)."""
    pidfile = Path(stack.pg_folder) / "data" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        return Path(f"/proc/{int(pidfile.read_text().split()[0])}").exists()
    return False


# ---- servers and workers ------------------------------------------------------------------------------------


def start_prefect(stack: Stack) -> None:
    """``prefect server start`` on the prefect database, with its own PREFECT_HOME in the stack folder."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(stack.root / "prefect-home"),
        "PREFECT_API_URL": stack.prefect_api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": stack.database_url("prefect", PREFECT_DRIVER),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": str(stack.scheduler).lower(),
    }
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(stack.prefect_port)]
    _spawn(stack, "prefect", cmd, env, stack.root)


def start_mlflow(stack: Stack, wait: bool = True) -> None:
    """``mlflow server`` on the mlflow database, serving the artifacts from ``artifacts/`` (proxied: clients
    upload and download through the server and need no artifact root of their own)."""
    env = {
        **os.environ,
        # In the environment rather than on the command line, where `ps` would show the password.
        "MLFLOW_BACKEND_STORE_URI": stack.database_url("mlflow"),
        # The GenAI job runner (half a dozen extra processes) is not needed to track training runs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    serve, destination = MLFLOW_ARTIFACT_FLAGS
    cmd = [sys.executable, "-m", "mlflow", "server", serve, destination, str(stack.root / "artifacts")]
    cmd += ["--host", "127.0.0.1", "--port", str(stack.mlflow_port), "--workers", str(MLFLOW_WORKERS)]
    _spawn(stack, "mlflow", cmd, env, stack.root)
    if wait:
        _wait_healthy(stack, "mlflow", f"{stack.mlflow_url}/health")


def stop_mlflow(stack: Stack) -> None:
    """Stop the MLflow server (SIGTERM to its process group); ``start_mlflow`` brings it back on the same port."""
    _stop_component(stack, "mlflow")


def worker_env(stack: Stack, folder: Path) -> dict[str, str]:
    """A worker's whole environment: the basics, the stack's URLs, and HOME, PREFECT_HOME and the corpus cache
    in its own folder; nothing of the deploying machine's settings."""
    env = {k: os.environ[k] for k in WORKER_BASICS + tuple(k.lower() for k in WORKER_BASICS) if k in os.environ}
    # The flow runs start `python -m prefect.engine`, found on PATH: this Python's first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    home = folder / "home"
    env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"), DEEPRNN_CACHE_DIR=str(folder / "cache"))
    return {**env, **stack.team_env()}


def start_worker(stack: Stack, name: str) -> Path:
    """A process worker of the pool, started in its own empty folder ``workers/NAME/work`` (where its flow runs
    run and write); returns that folder."""
    if f"worker:{name}" in stack.pids:
        raise StackError(f"worker {name} is already running")
    folder = stack.root / "workers" / name
    work = folder / "work"
    for path in (work, folder / "home", folder / "cache"):
        path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name]
    _spawn(stack, f"worker:{name}", cmd, worker_env(stack, folder), work)
    return work


def _end_worker(stack: Stack, name: str, sig: signal.Signals, grace: float) -> None:
    key = f"worker:{name}"
    runs = descendants(stack.pids[key]) if component_members(stack, key) else set()
    # A worker with no flow run has nothing to save: Prefect's worker can take its whole grace to act on a
    # signal, so an idle one gets a short one.
    idle = not any(_is_flow_run(pid) for pid in runs)
    # The flow runs were found first: once their worker is gone they belong to init.
    _stop_component(stack, key, sig, min(grace, IDLE_WORKER_GRACE) if idle else grace)
    for pid in runs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgrp = os.getpgid(pid)
            if group_members(pgrp):
                stop_group(pgrp, sig, grace)


def _is_flow_run(pid: int) -> bool:
    """Whether process ``pid`` is a flow run a process worker started (``python -m prefect.engine``)."""
    try:
        return b"prefect.engine" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_worker(stack: Stack, name: str) -> None:
    """SIGKILL to a worker's process group and to the flow runs it started, as if its machine were lost."""
    _end_worker(stack, name, signal.SIGKILL, 10.0)


def stop_worker(stack: Stack, name: str) -> None:
    """Stop a worker and its flow runs with SIGTERM (a training checkpoints and stops), SIGKILL after 30 s."""
    _end_worker(stack, name, signal.SIGTERM, 30.0)


def deploy(stack: Stack) -> None:
    """Create the work pool, deploy every deployment of prefect.yaml and prepare the server for unattended runs
    (`deeprnn setup-server`: training slots, zombie detection)."""
    env = {**os.environ, **stack.team_env()}
    steps = [
        ["prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite"],
        ["prefect", "--no-prompt", "deploy", "--all"],
        ["deeprnn.cli.app", "setup-server"],
    ]
    for step in steps:
        done = subprocess.run([sys.executable, "-m", *step], cwd=PROJECT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise StackError(f"{' '.join(step)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def status(stack: Stack) -> dict[str, bool]:
    """Each component (postgres, prefect, mlflow, worker:NAME) and whether it is running."""
    running = {"postgres": postgres_running(stack)}
    for key in stack.pids:
        running[key] = bool(component_members(stack, key))
    return running


# ---- the whole stack ----------------------------------------------------------------------------------------


def _fresh(root: Path, scheduler: bool) -> Stack:
    pg_bin = find_postgres()
    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    token = secrets.token_urlsafe
    stack = Stack(root, token(24), token(24), str(pg_bin), str(_pg_folder(root)), *ports, scheduler=scheduler)
    stack.save()
    init_postgres(stack)
    return stack


def _again(stack: Stack, scheduler: bool) -> Stack:
    """A stopped stack brought back on its ports with its data."""
    if any(status(stack).values()):
        raise StackError(
            f"the stack in {stack.root} is running: `python scripts/team_stack.py down --dir {stack.root}`"
        )
    for port in (stack.pg_port, stack.prefect_port, stack.mlflow_port):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                raise StackError(f"port {port} of the stack in {stack.root} is taken: `down --purge` and `up` again")
    stack.pids, stack.scheduler = {}, scheduler
    _pg_ctl(stack, "start")
    return stack


def up(root: Path, workers: int = 0, deploy_all: bool = False, scheduler: bool = True) -> Stack:
    """Start the stack in ``root`` (again, with its data, if it was stopped): PostgreSQL, both servers (waited
    for), then with ``deploy_all`` the pool, the deployments and setup-server, then ``workers`` workers."""
    root = Path(root).resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "artifacts").mkdir(exist_ok=True)
    known = Stack.load(root) if (root / STATE).is_file() else None
    again = known is not None and (Path(known.pg_folder) / "data").is_dir()
    stack = _again(known, scheduler) if known is not None and again else None
    try:
        stack = stack or _fresh(root, scheduler)
        start_prefect(stack)
        start_mlflow(stack, wait=False)
        _wait_healthy(stack, "prefect", f"{stack.prefect_api_url}/health")
        if deploy_all:  # needs only Prefect: done while the MLflow server starts
            deploy(stack)
        _wait_healthy(stack, "mlflow", f"{stack.mlflow_url}/health")
        for number in range(1, workers + 1):
            start_worker(stack, f"worker-{number}")
    except BaseException:
        down(root, purge=not again)  # a stack that never started leaves only its logs
        raise
    return stack


def down(root: Path, purge: bool = False) -> None:
    """Stop the workers (and their flow runs), the servers, then PostgreSQL; nothing to stop is fine. ``purge``
    also deletes the databases, the artifacts, the workers' folders, stack.json and team.env (not the logs)."""
    root = Path(root).resolve()
    if not (root / STATE).is_file():
        return
    stack = Stack.load(root)
    for name in stack.workers:
        stop_worker(stack, name)
    for key in ("prefect", "mlflow"):
        _stop_component(stack, key)
    if postgres_running(stack):
        _pg_ctl(stack, "-m", "fast", "stop")
    if purge:
        for folder in (Path(stack.pg_folder), root / "artifacts", root / "workers", root / "prefect-home"):
            shutil.rmtree(folder, ignore_errors=True)
        (root / ENV_FILE).unlink(missing_ok=True)
        (root / STATE).unlink()


def describe(stack: Stack) -> str:
    """A short table of what runs where, the password masked."""
    running = status(stack)
    databases = stack.database_url("{" + ",".join(DATABASES) + "}", masked=True)
    rows = [
        ("postgres", databases, running["postgres"]),
        ("prefect", f"{stack.prefect_api_url}  (dashboard: {stack.prefect_api_url[:-4]})", running.get("prefect")),
        ("mlflow", f"{stack.mlflow_url}  (artifacts: {stack.root / 'artifacts'})", running.get("mlflow")),
    ]
    rows += [
        (name, f"{stack.root / 'workers' / name / 'work'}  (pool {POOL})", running[f"worker:{name}"])
        for name in stack.workers
    ]
    lines = [f"{name:<10} {'up' if alive else 'DOWN':<5} {where}" for name, where, alive in rows]
    return "\n".join(lines + [f"{'env':<10} {'':<5} source {stack.root / ENV_FILE}"])


def main(argv: list[str] | None = None) -> int:
    """The command line: up, status, down."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="team_stack.py")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the stack (again) in --dir")
    start.add_argument("--workers", type=int, default=0, help="process workers to start (default 0)")
    start.add_argument("--deploy", action="store_true", help="work pool, prefect deploy --all, deeprnn setup-server")
    start.add_argument("--no-scheduler", action="store_true", help="no runs from the deployments' schedules")
    stop = commands.add_parser("down", help="stop everything in --dir (safe to repeat)")
    stop.add_argument("--purge", action="store_true", help="also delete the databases and artifacts")
    show = commands.add_parser("status", help="what runs where")
    for command in (start, stop, show):
        command.add_argument("--dir", type=Path, required=True, help="the stack's folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if args.workers < 0:
                raise StackError("--workers must be 0 or more")
            print(describe(up(args.dir, args.workers, args.deploy, not args.no_scheduler)))
        elif args.command == "status":
            print(describe(Stack.load(args.dir)))
        else:
            down(args.dir, args.purge)
    except StackError as error:
        print(f"team_stack: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
