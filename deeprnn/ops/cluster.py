"""Where sweep trials run: Prefect's Dask task runner (``prefect-dask``), on a cluster on this machine by
default or on an existing Dask cluster at an address.

- Local, CPU: ``distributed.LocalCluster`` with one single-threaded worker process per core (or ``workers``),
  so several trials train side by side, each on one core.
- Local, GPUs: one worker process per GPU, each seeing only its own GPU (``CUDA_VISIBLE_DEVICES``) and
  advertising the Dask worker resource ``GPU=1``.
- Existing cluster: ``address`` (``tcp://scheduler:8786``). GPU workers are started with
  ``--resources GPU=1 --nthreads 1``, one per GPU.

A trial that trains on a GPU asks the scheduler for ``GPU: 1``, so Dask runs at most one trial per GPU;
CPU trials ask for nothing. ``DEEPRNN_DASK_ADDRESS`` and ``DEEPRNN_DASK_WORKERS`` set the defaults (for
deployments, whose flow runs start without the command line).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from deeprnn.ops.dask_worker_logs import PRELOAD, quiet_closed_comms

if TYPE_CHECKING:  # imported where used: the GPU helpers need only dask.distributed and torch
    from prefect_dask import DaskTaskRunner


ADDRESS_ENV = "DEEPRNN_DASK_ADDRESS"
WORKERS_ENV = "DEEPRNN_DASK_WORKERS"
ON_THIS_MACHINE = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}  # a local cluster's scheduler
GPU = "GPU"  # the Dask worker resource name; workers started elsewhere must use the same


class ClusterConfigError(ValueError):
    """The cluster cannot run this sweep as asked (e.g. GPU trials but no GPU workers)."""


def local_gpus() -> list[str]:
    """The CUDA devices this machine lets us use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    import torch

    ids = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    count = torch.cuda.device_count()  # 0 without CUDA
    return ids[:count] if ids else [str(i) for i in range(count)]


def local_gpu_cluster(gpus: list[str]) -> Any:
    """A Dask cluster on this machine with one single-threaded worker process per GPU, pinned to it."""
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": ON_THIS_MACHINE}
    options = {"host": "127.0.0.1", "nthreads": 1, "resources": {GPU: 1}, "preload": [PRELOAD]}
    # Each worker's torch sees its own GPU, as cuda:0.
    workers = {f"gpu-{g}": {"cls": Nanny, "options": {**options, "env": {"CUDA_VISIBLE_DEVICES": g}}} for g in gpus}
    return SpecCluster(scheduler=scheduler, workers=workers, name="deeprnn-gpus")


def dask_task_runner(address: str | None = None, workers: int | None = None, use_gpus: bool = True) -> DaskTaskRunner:
    """The task runner for a sweep: the Dask scheduler at ``address``, else a new cluster on this machine
    (one worker per GPU when there are GPUs and ``use_gpus``, else ``workers`` single-threaded processes,
    default one per CPU core). Nothing starts until the sweep submits its first trial."""
    from prefect_dask import DaskTaskRunner

    if workers is not None and workers < 1:
        raise ClusterConfigError(f"--workers must be at least 1, got {workers}")
    if address:
        return DaskTaskRunner(address=address if "://" in address else "tcp://" + address)
    quiet_closed_comms()  # the local cluster's scheduler runs in this process
    gpus = local_gpus() if use_gpus else []
    if gpus:
        return DaskTaskRunner(cluster_class=local_gpu_cluster, cluster_kwargs={"gpus": gpus[: workers or len(gpus)]})
    # One single-threaded worker process per trial (Dask also sets OMP_NUM_THREADS=1 there); the preload drops
    # the traceback of a worker closing with a stopped sweep.
    local = {"threads_per_worker": 1, "processes": True, "preload": [PRELOAD], **ON_THIS_MACHINE}
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or os.cpu_count() or 1, **local})


def task_runner_from_env() -> DaskTaskRunner:
    """``dask_task_runner`` configured by ``DEEPRNN_DASK_ADDRESS`` / ``DEEPRNN_DASK_WORKERS`` (both optional)."""
    workers = os.environ.get(WORKERS_ENV)
    if workers is not None and not workers.strip().isdigit():
        raise ClusterConfigError(f"{WORKERS_ENV} must be a whole number, got {workers!r}")
    return dask_task_runner(os.environ.get(ADDRESS_ENV) or None, int(workers) if workers else None)


def is_remote(address: str | None) -> bool:
    """True when ``address`` names a scheduler on another machine (not loopback)."""
    address = address or ""  # none: a cluster on this machine
    host = urlsplit(address if "://" in address else "tcp://" + address).hostname or ""
    return host not in ("127.0.0.1", "localhost", "::1", "")


def cluster_gpus() -> int:
    """GPUs the running flow's Dask workers advertise (their ``GPU`` resources, summed); starts the local
    cluster if it is not up yet."""
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    if not isinstance(runner, DaskTaskRunner):
        return 0
    workers = runner.client.scheduler_info(n_workers=-1).get("workers", {})
    return int(sum(w.get("resources", {}).get(GPU, 0) for w in workers.values()))


def gpu_request(device: str, gpus: int) -> dict[str, float] | None:
    """The Dask resources one trial on ``device`` asks for, given the cluster's GPU count.

    ``cuda``: one GPU, and there must be GPU workers (else the trial would wait forever); ``auto``: one GPU
    when the cluster has any, else none; ``cpu`` and ``mps``: none.
    """
    if device.startswith("cuda") and gpus == 0:
        raise ClusterConfigError(
            f"the trials ask for device {device!r} but no Dask worker offers a GPU: start GPU workers with "
            f"`dask worker <scheduler> --resources {GPU}=1 --nthreads 1` (one per GPU), or use --device cpu"
        )
    return {GPU: 1} if device.startswith("cuda") or (device == "auto" and gpus > 0) else None


def resources(request: dict[str, float] | None) -> contextlib.AbstractContextManager[Any]:
    """Attach Dask resource requirements to the tasks submitted inside this block."""
    import dask

    return dask.annotate(resources=request) if request else contextlib.nullcontext()
