"""One training step and the pieces that keep it fast: clipping without a host sync, the fused optimizer,
device-side timing, the choice of bf16 autocast, and the whole step captured once as a CUDA graph.

The step (``TrainStep``) reads and writes static buffers (the minibatch ``x, y``, the carried hidden state
and the summed loss), so on CUDA it is recorded once and replayed, which removes the ~100 kernel launches
per step that bound the book's loop; elsewhere (or when capture fails) it runs eagerly, with the same
arithmetic.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, cast

import torch
import torch.nn.functional as F

from deeprnn.config import TrainConfig
from deeprnn.device import synchronize
from deeprnn.model import RNNLM, copy_state_, state_tensors, zero_state_

log = logging.getLogger(__name__)


def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The book's ``grad_clipping`` without a host sync: scale by ``min(1, max_norm / norm)``; returns the norm.

    Multiplying by exactly 1.0 when ``norm <= max_norm`` leaves the gradients bit-for-bit unchanged, so this
    matches the book's ``if norm > theta`` branch.
    """
    norms = torch._foreach_norm(grads)  # one fused kernel per dtype/device group
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / total, max=1.0)
    torch._foreach_mul_(grads, coef)
    return cast(torch.Tensor, total)


def mark(device: torch.device) -> Any:
    """Now, to time an epoch by: a recorded CUDA event on the GPU (read back later, no sync), else host time."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start: Any, end: Any) -> float:
    """Seconds between two ``mark``s (CUDA events: once the device has passed the second)."""
    return float(end - start) if isinstance(start, float) else float(start.elapsed_time(end)) / 1000.0


class TrainStep:
    """Forward, backward, clip, update and state carry on static buffers, eager or as a captured CUDA graph.

    Before each call the loop loads a minibatch into ``x`` and ``y``; the call adds the step's loss to
    ``loss_sum`` and leaves the detached new hidden state in ``state``, all without a host sync.
    """

    def __init__(self, model: RNNLM, cfg: TrainConfig, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.use_graph = cfg.fast and device.type == "cuda"  # captured by ``capture`` before training starts
        # bf16 autocast, measured on an H200 with the book's preset: cuDNN's LSTM step takes 661 us in bf16
        # against 1,135 us in fp32, and training still reaches perplexity 1.02 with the book's samples. The CPU
        # gains nothing from it.
        if cfg.precision == "bf16" and device.type != "cuda":
            raise ValueError(f"precision 'bf16' needs a CUDA device, not {device}; use --precision auto or fp32")
        self.bf16 = cfg.precision != "fp32" and device.type == "cuda" and bool(torch.cuda.is_bf16_supported())
        # The configured optimizer: fused on CUDA, capturable (for CUDA graphs) where the algorithm has state,
        # its learning rate a tensor the graph reads where a schedule changes it.
        fused = device.type == "cuda"
        lr = torch.tensor(cfg.lr, device=device) if self.use_graph and cfg.lr_schedule != "constant" else cfg.lr
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        stateful = {} if cfg.optimizer == "sgd" else {"capturable": fused}
        self.optimizer = cls(self.params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None, **stateful)
        # Fixed addresses: a CUDA graph replays reads and writes of exactly these tensors.
        self.x = torch.zeros(cfg.batch_size, cfg.num_steps, dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.state = model.begin_state(cfg.batch_size, device)
        self.loss_sum = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        """Take one step on the minibatch in ``x, y``."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.eager()

    def eager(self) -> None:
        """The step as plain PyTorch calls: reads ``x, y, state``; no host sync."""
        if self.cfg.partition == "random":
            zero_state_(self.state)  # the book resets the state for every random minibatch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, new_state = self.model(self.x, self.state)  # (T*B, V)
        loss = F.cross_entropy(logits.float(), self.y.T.reshape(-1))  # time-major targets, as the logits
        loss.backward()
        if self.cfg.clip_norm is not None:
            clip_grad_norm_(cast(list[torch.Tensor], [p.grad for p in self.params]), self.cfg.clip_norm)
        self.optimizer.step()
        self.loss_sum += loss.detach()
        copy_state_(self.state, new_state)

    def capture(self) -> None:
        """Record the step as a CUDA graph; fall back to eager steps if the platform refuses."""
        saved = self._snapshot()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up allocates grads and optimizer state outside the graph
                    self.eager()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._restore(saved)  # undo the warm-up updates: training starts from the same weights
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.eager()
            self.graph = graph
        except Exception as exc:  # capture is an optimization: never fail a run over it
            log.warning("CUDA graph capture failed (%s: %s); using eager steps", type(exc).__name__, exc)
            synchronize(self.device)
            self._restore(saved)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (in place where it is a tensor the graph reads)."""
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def carried(self) -> dict[str, Any]:
        """The carried hidden state and the summed loss, copied to the CPU (for a checkpoint inside an epoch)."""
        return {
            "state": [t.detach().to("cpu", copy=True) for t in state_tensors(self.state)],
            "loss_sum": self.loss_sum.detach().to("cpu", copy=True),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Put ``carried()`` values back into the step's buffers (resuming inside an epoch)."""
        copy_state_(self.state, tuple(saved["state"]))
        self.loss_sum.copy_(saved["loss_sum"])

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """Load a saved optimizer state: a copy (the optimizer may keep the saved tensors themselves), with
        learning rates as tensors where the optimizer keeps them as tensors (the CUDA graph path with a
        schedule), whichever way the state was saved."""
        state = copy.deepcopy(saved)
        if torch.is_tensor(self.optimizer.param_groups[0]["lr"]):
            for group in state["param_groups"]:
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(group["lr"], device=self.device)
        self.optimizer.load_state_dict(state)

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = [p.data for p in self.params]
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        tensors += [group["lr"] for group in self.optimizer.param_groups if torch.is_tensor(group["lr"])]
        return [(t, t.detach().clone()) for t in tensors]

    def _restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for dst, src in saved:
                dst.copy_(src)
            # Optimizer state created by the warm-up (Adam moments, step counts) goes back to its start.
            known = {id(d) for d, _ in saved}
            for s in self.optimizer.state.values():
                for t in s.values():
                    if torch.is_tensor(t) and id(t) not in known:
                        t.zero_()
            self.loss_sum.zero_()
            zero_state_(self.state)
