"""Device choice (once per run), seeding, and waiting for a device to finish its queued work."""

from __future__ import annotations

import random

import torch


class DeviceUnavailableError(RuntimeError):
    """The requested device is not present on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device that exists here.

    ``auto`` picks CUDA, then Apple MPS, then the CPU. Asking for a device that is not there is an error,
    never a silent fallback: a run meant for the GPU must not quietly take hours on the CPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name!r} was requested but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError("device 'mps' was requested but Apple MPS is not available here")
    if name in ("cpu", "mps"):
        return torch.device(name)
    raise DeviceUnavailableError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def as_device(device: torch.device | str) -> torch.device:
    """A device already resolved, as it is; a name (``auto``, ``cpu``, ``cuda:1``) resolved by ``resolve_device``."""
    return device if isinstance(device, torch.device) else resolve_device(device)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every GPU) once, at the start of a run."""
    random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (CUDA and Apple MPS run asynchronously to the
    host); on the CPU, where every call has finished when it returns, do nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe(device: torch.device) -> str:
    """A human-readable name for logs, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
