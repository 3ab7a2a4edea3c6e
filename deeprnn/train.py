"""Stage 6: the training loop, with the book's semantics (D2L 8.5 ``train_ch8``) and a fast path.

Semantics kept from the book: per epoch a fresh minibatch offset; with sequential partitioning the hidden
state starts at zero each epoch and is carried (detached) from one minibatch to the next; cross-entropy
averaged over the minibatch; the global gradient norm clipped to ``clip_norm`` exactly as ``grad_clipping``
does (scale by ``theta / norm`` only when ``norm > theta``); per-epoch perplexity = exp(mean training loss)
and tokens/s over the epoch.

What makes it fast without changing those semantics:

* the token ids live on the training device; an epoch's minibatches are views of them;
* the step never syncs with the host: the loss is summed on the device, clipping is a multiply by
  ``min(1, theta / norm)`` instead of a Python ``if``, and the optimizer is fused (or ``foreach``);
* on CUDA the whole step (forward, backward, clip, update, state carry) is captured once as a CUDA graph
  and replayed, which removes the ~100 kernel launches per step that bound the book's loop;
* the host reads losses and timings back only every few epochs (to log, evaluate or checkpoint), using CUDA
  events for per-epoch times, so the GPU never waits for Python;
* on the CPU nothing is switched off: oneDNN's LSTM kernels measured 1.5x faster than PyTorch's native ones
  for the book's shapes with 2 threads (``bench/train_speed.py --mode kernels``), so they stay on.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from deeprnn.batching import check_enough_tokens, epoch_batches
from deeprnn.config import TrainConfig
from deeprnn.evaluate import perplexity, perplexity_from_loss
from deeprnn.model import RNNLM, copy_state_, detach_state, zero_state_

log = logging.getLogger(__name__)

_SYNC_SECONDS = 2.0  # read results back at least this often, so progress stays visible on long epochs


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, value: float, what: str | None = None) -> None:
        super().__init__(
            f"training diverged at epoch {epoch}: {what or f'the mean loss was {value}'}. Lower --lr (or "
            "--weight-decay) and keep gradient clipping on (--clip-norm); checkpoints written before this "
            "epoch are kept"
        )
        self.epoch = epoch


@dataclass
class EpochStats:
    """What one epoch produced."""

    epoch: int  # 1-based
    train_perplexity: float
    tokens_per_sec: float
    seconds: float
    lr: float
    heldout_perplexity: float | None = None


@dataclass
class FitResult:
    """The outcome of ``Trainer.fit``."""

    history: list[EpochStats]
    epochs_done: int
    final_train_perplexity: float
    best_epoch: int | None
    best_heldout_perplexity: float | None
    train_seconds: float
    tokens_per_sec: float
    step_mode: str  # 'cuda-graph' or 'eager'
    precision: str  # 'bf16' (autocast) or 'fp32'

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The book's ``grad_clipping`` without a host sync: scale by ``min(1, max_norm / norm)``; returns the norm.

    Multiplying by exactly 1.0 when ``norm <= max_norm`` leaves the gradients bit-for-bit unchanged, so this
    matches the book's ``if norm > theta`` branch.
    """
    norms = torch._foreach_norm(grads)  # one fused kernel per dtype/device group
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / total, max=1.0)
    torch._foreach_mul_(grads, coef)
    return total


def make_optimizer(model: RNNLM, cfg: TrainConfig, device: torch.device, tensor_lr: bool) -> torch.optim.Optimizer:
    """The configured optimizer; fused on CUDA, capturable (for CUDA graphs) where the algorithm has state."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr: float | torch.Tensor = torch.tensor(cfg.lr, device=device) if tensor_lr else cfg.lr
    fused = device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None, capturable=fused)


class _Clock:
    """Per-epoch durations: CUDA events on the GPU (read back later, no sync), host time elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


@dataclass
class _Pending:
    epoch: int
    loss: torch.Tensor  # mean training loss of the epoch, on the device
    start: Any
    end: Any
    tokens: int
    lr: float


@dataclass
class _Best:
    epoch: int | None = None
    value: float | None = None
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)


class Trainer:
    """Trains an ``RNNLM`` on token ids; resumable through ``state_dict``/``load_state_dict``.

    ``heldout_ids`` is evaluated every ``cfg.eval_every`` epochs. With ``select_best`` (a validation split)
    the weights of the best held-out epoch are restored at the end; otherwise the last epoch's are kept, as
    in the book.
    """

    def __init__(
        self,
        model: RNNLM,
        train_ids: torch.Tensor,
        cfg: TrainConfig,
        device: torch.device,
        heldout_ids: torch.Tensor | None = None,
        select_best: bool = False,
    ) -> None:
        check_enough_tokens(train_ids.numel(), cfg.batch_size, cfg.num_steps)
        self.cfg = cfg
        self.device = device
        self.model = model.to(device).train()
        self.train_ids = train_ids.to(device=device, dtype=torch.long)
        self.heldout_ids = heldout_ids.to(device=device, dtype=torch.long) if heldout_ids is not None else None
        self.select_best = select_best
        self.rng = random.Random(cfg.seed)
        self.epoch = 0  # epochs completed
        self.best = _Best()
        self.use_graph = cfg.fast and device.type == "cuda"
        self.autocast = _use_bf16(cfg.precision, device)
        self.optimizer = make_optimizer(
            self.model, cfg, device, tensor_lr=self.use_graph and cfg.lr_schedule != "constant"
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Static buffers the step reads and writes; fixed addresses let a CUDA graph replay them.
        self.x = torch.zeros(cfg.batch_size, cfg.num_steps, dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.state = self.model.begin_state(cfg.batch_size, device)
        self.loss_acc = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.step_mode = "eager"
        self.clock = _Clock(device)

    # ----- one step -------------------------------------------------------------------------------
    def _step(self) -> None:
        """Forward, backward, clip, update, carry the state: reads ``x, y, state``; no host sync."""
        if self.cfg.partition == "random":
            zero_state_(self.state)  # the book resets the state for every random minibatch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, new_state = self.model(self.x, self.state)  # (T*B, V)
        loss = F.cross_entropy(logits.float(), self.y.T.reshape(-1))  # time-major targets, as the logits
        loss.backward()
        if self.cfg.clip_norm is not None:
            clip_grad_norm_([p.grad for p in self.params], self.cfg.clip_norm)
        self.optimizer.step()
        self.loss_acc += loss.detach()
        copy_state_(self.state, detach_state(new_state))

    def _capture(self) -> None:
        """Record ``_step`` as a CUDA graph; fall back to eager steps if the platform refuses."""
        saved = self._snapshot()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up allocates grads and optimizer state outside the graph
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._restore(saved)  # undo the warm-up updates: training starts from the same weights
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.graph, self.step_mode = graph, "cuda-graph"
        except Exception as exc:  # capture is an optimization: never fail a run over it
            log.warning("CUDA graph capture failed (%s: %s); using eager steps", type(exc).__name__, exc)
            torch.cuda.synchronize(self.device)
            self._restore(saved)
            self.graph, self.step_mode = None, "eager"

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = [p.data for p in self.params]
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                tensors.append(group["lr"])
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
            self.loss_acc.zero_()
            zero_state_(self.state)

    # ----- schedule -------------------------------------------------------------------------------
    def lr_at(self, epoch: int) -> float:
        """Learning rate for a 1-based epoch: constant, or cosine from ``lr`` towards 0."""
        if self.cfg.lr_schedule == "cosine":
            return self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.cfg.epochs))
        return self.cfg.lr

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # in place: the captured graph reads this tensor
            else:
                group["lr"] = lr

    # ----- the loop -------------------------------------------------------------------------------
    def fit(
        self,
        on_epoch: Callable[[EpochStats], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        checkpoint_every: int | None = None,
    ) -> FitResult:
        """Train from ``self.epoch`` to ``cfg.epochs``, calling ``on_epoch`` for every epoch (in order, a few
        at a time) and ``on_checkpoint(epoch)`` every ``checkpoint_every`` epochs and at the end."""
        cfg = self.cfg
        history: list[EpochStats] = []
        pending: list[_Pending] = []
        t_start = time.perf_counter()
        last_sync = t_start
        if self.use_graph and self.graph is None and self.epoch < cfg.epochs:
            self._capture()
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            lr = self.lr_at(epoch)
            self._set_lr(lr)
            xs, ys = epoch_batches(self.train_ids, cfg.batch_size, cfg.num_steps, cfg.partition, self.rng)
            zero_state_(self.state)  # the book starts every epoch from a zero state
            self.loss_acc.zero_()
            start = self.clock.mark()
            for i in range(xs.shape[0]):
                self.x.copy_(xs[i])
                self.y.copy_(ys[i])
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step()
            end = self.clock.mark()
            nb = xs.shape[0]
            pending.append(_Pending(epoch, self.loss_acc / nb, start, end, nb * cfg.batch_size * cfg.num_steps, lr))
            self.epoch = epoch
            last = epoch == cfg.epochs
            evaluate = self.heldout_ids is not None and (epoch % cfg.eval_every == 0 or last)
            checkpoint = on_checkpoint is not None and (
                last or (checkpoint_every is not None and epoch % checkpoint_every == 0)
            )
            now = time.perf_counter()
            if last or evaluate or checkpoint or epoch % cfg.log_every == 0 or now - last_sync > _SYNC_SECONDS:
                stats = self._drain(pending, evaluate)
                history.extend(stats)
                if on_epoch is not None:
                    for s in stats:
                        on_epoch(s)
                if checkpoint:
                    self._check_finite_weights(epoch)  # never overwrite a good checkpoint with NaNs
                    on_checkpoint(epoch)  # type: ignore[misc]
                pending = []
                last_sync = time.perf_counter()
        self.clock.sync()
        train_seconds = time.perf_counter() - t_start
        if self.select_best and self.best.state is not None:
            self.model.load_state_dict(self.best.state)
        total_tokens = sum(h.tokens_per_sec * h.seconds for h in history)
        device_seconds = sum(h.seconds for h in history)
        return FitResult(
            history=history,
            epochs_done=self.epoch,
            final_train_perplexity=history[-1].train_perplexity if history else math.nan,
            best_epoch=self.best.epoch,
            best_heldout_perplexity=self.best.value,
            train_seconds=train_seconds,
            tokens_per_sec=total_tokens / device_seconds if device_seconds > 0 else 0.0,
            step_mode=self.step_mode,
            precision="bf16" if self.autocast else "fp32",
        )

    def _drain(self, pending: list[_Pending], evaluate: bool) -> list[EpochStats]:
        """Read the pending epochs' losses and times back (one sync), check them, evaluate if due."""
        losses = torch.stack([p.loss for p in pending]).tolist()  # the only sync of these epochs
        self.clock.sync()
        stats = []
        for p, loss in zip(pending, losses):
            if not math.isfinite(loss):
                raise TrainingDivergedError(p.epoch, loss)
            seconds = max(self.clock.seconds(p.start, p.end), 1e-9)
            stats.append(EpochStats(p.epoch, perplexity_from_loss(loss), p.tokens / seconds, seconds, p.lr))
        if evaluate and self.heldout_ids is not None:
            value = perplexity(self.model, self.heldout_ids, rows=self.cfg.batch_size)
            stats[-1].heldout_perplexity = value
            if self.best.value is None or value < self.best.value:
                self.best.epoch, self.best.value = stats[-1].epoch, value
                if self.select_best:
                    self.best.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return stats

    def _check_finite_weights(self, epoch: int) -> None:
        """Raise ``TrainingDivergedError`` when a weight is NaN or infinite (one host sync).

        An epoch's mean loss is measured before its last update, so a finite loss does not prove the
        weights that follow it are finite.
        """
        finite = torch.stack([p.detach().isfinite().all() for p in self.params]).all()
        if not bool(finite):
            raise TrainingDivergedError(epoch, math.nan, "the weights became NaN or infinite")

    # ----- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights needed to continue bit-for-bit: optimizer, RNGs, epoch, best."""
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "python_rng": _rng_to_lists(self.rng.getstate()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "best_epoch": self.best.epoch,
            "best_value": self.best.value,
            "best_state": {k: v.to("cpu") for k, v in self.best.state.items()} if self.best.state else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` (the model's weights are loaded separately, before this)."""
        if self.graph is not None:
            raise RuntimeError("load the trainer state before training starts")
        self.epoch = int(state["epoch"])
        opt_state = copy.deepcopy(state["optimizer"])
        for group in opt_state["param_groups"]:
            current = self.optimizer.param_groups[0]["lr"]
            if torch.is_tensor(current) and not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(group["lr"], device=self.device)
        self.optimizer.load_state_dict(opt_state)
        self.rng.setstate(_rng_from_lists(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.best = _Best(state.get("best_epoch"), state.get("best_value"))
        if state.get("best_state"):
            self.best.state = {k: v.to(self.device) for k, v in state["best_state"].items()}


def _use_bf16(precision: str, device: torch.device) -> bool:
    """Whether the step runs under bf16 autocast.

    Measured on an H200 with the book's preset: cuDNN's LSTM step takes 661 us in bf16 against 1,135 us in
    fp32, and training still reaches perplexity 1.02 with the book's samples. The CPU gains nothing from it.
    """
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if precision == "bf16":
        raise ValueError(f"precision 'bf16' needs a CUDA device, not {device}; use --precision auto or fp32")
    return False


def _rng_to_lists(state: tuple) -> list:
    # random.Random's state as plain lists, which torch.load(weights_only=True) accepts.
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_lists(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
