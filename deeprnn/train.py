"""Stage 6: the training loop, with the book's semantics (D2L 8.5 ``train_ch8``) and a fast path.

Semantics kept from the book: per epoch a fresh minibatch offset; with sequential partitioning the hidden
state starts at zero each epoch and is carried (detached) from one minibatch to the next; cross-entropy
averaged over the minibatch; the global gradient norm clipped to ``clip_norm`` exactly as ``grad_clipping``
does (scale by ``theta / norm`` only when ``norm > theta``); per-epoch perplexity = exp(mean training loss)
and tokens/s over the epoch.

What makes it fast without changing those semantics:

* the token ids live on the training device in the dtype they come in (uint8 from a token cache); an
  epoch's minibatches are views of them (random ones: gathered one minibatch at a time), each converted to
  int64 by the copy into the step's static buffers;
* the step never syncs with the host: the loss is summed on the device, clipping is a multiply by
  ``min(1, theta / norm)`` instead of a Python ``if``, and the optimizer is fused (or ``foreach``);
* on CUDA the whole step (forward, backward, clip, update, state carry) is captured once as a CUDA graph
  and replayed, which removes the ~100 kernel launches per step that bound the book's loop;
* the host reads losses and timings back only every few epochs (to log, evaluate or checkpoint), using CUDA
  events for per-epoch times, so the GPU never waits for Python;
* inside a long epoch the host still reads back every ``_SYNC_SECONDS`` (progress), and every
  ``eval_every_steps`` / ``checkpoint_every_steps`` steps; ``max_steps`` ends training at any minibatch, and a
  checkpoint taken there carries the position inside the epoch, so a resume continues from the next one;
* on the CPU nothing is switched off: oneDNN's LSTM kernels measured 1.5x faster than PyTorch's native ones
  for the book's shapes with 2 threads (``bench/train_speed.py --mode kernels``), so they stay on.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F

from deeprnn.batching import EpochBatches, check_enough_tokens
from deeprnn.config import TrainConfig
from deeprnn.evaluate import perplexity, perplexity_from_loss
from deeprnn.model import RNNLM, copy_state_, detach_state, zero_state_
from deeprnn.progress import EpochStats, FitResult, Reporter, StepStats
from deeprnn.step import Clock, clip_grad_norm_, make_optimizer, use_bf16

# Importable from here as before: ``from deeprnn.train import EpochStats, clip_grad_norm_``.
__all__ = [
    "EpochStats",
    "FitResult",
    "StepStats",
    "Trainer",
    "TrainingDivergedError",
    "clip_grad_norm_",
    "make_optimizer",
]

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
class _Pending:
    epoch: int
    loss: torch.Tensor  # mean training loss of the epoch (or of its part trained), on the device
    loss_sum: torch.Tensor  # the summed loss behind it, on the device
    start: Any
    end: Any
    tokens: int
    lr: float
    step: int
    batches: int  # minibatches the mean is over
    partial: bool


@dataclass
class _Best:
    epoch: int | None = None
    value: float | None = None
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class _Position:
    """The epoch in progress: what a checkpoint inside it needs to continue from the same minibatch."""

    epoch: int
    batch: int  # minibatches done
    batches: int
    rng_before: list[Any]  # the Python RNG state before this epoch's minibatches were drawn


@dataclass
class _Run:
    """Bookkeeping of one ``fit`` call: callbacks, what is not yet read back, the last report."""

    on_epoch: Callable[[EpochStats], None] | None
    on_checkpoint: Callable[[int], None] | None
    checkpoint_every: int | None
    on_step: Callable[[StepStats], None] | None
    reporter: Reporter
    t_start: float
    history: list[EpochStats] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    last_sync: float = 0.0
    drained_loss_sum: float = 0.0  # summed loss and minibatches of the last epoch read back
    drained_batches: int = 0


class Trainer:
    """Trains an ``RNNLM`` on token ids; resumable through ``state_dict``/``load_state_dict``.

    ``heldout_ids`` is evaluated every ``cfg.eval_every`` epochs and every ``cfg.eval_every_steps`` steps,
    over its first ``cfg.eval_max_tokens`` tokens. With ``select_best`` (a validation split) the weights of
    the best held-out epoch are restored at the end; otherwise the last epoch's are kept, as in the book.
    Token ids may be of any integer dtype and stay in it (a CPU tensor over a memory map stays one).
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
        if train_ids.is_floating_point() or train_ids.is_complex() or train_ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, not {train_ids.dtype}")
        self.cfg = cfg
        self.device = device
        self.model = model.to(device).train()
        # Ids keep the dtype they come in (uint8 from a token cache is 8x smaller than int64): each minibatch
        # becomes int64 when it is copied into ``x``/``y``, each evaluation chunk when it reaches the model.
        self.train_ids = train_ids.to(device=device)
        self.heldout_ids = heldout_ids
        self.select_best = select_best
        self.rng = random.Random(cfg.seed)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken, across resumes
        self._pos: _Position | None = None  # the epoch in progress
        self._resume: dict[str, Any] | None = None  # a position inside an epoch to continue from
        self.best = _Best()
        self.use_graph = cfg.fast and device.type == "cuda"
        self.autocast = use_bf16(cfg.precision, device)
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
        self.clock = Clock(device)

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
            clip_grad_norm_(cast(list[torch.Tensor], [p.grad for p in self.params]), self.cfg.clip_norm)
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
        on_step: Callable[[StepStats], None] | None = None,
    ) -> FitResult:
        """Train from where the trainer stands to ``cfg.epochs`` or ``cfg.max_steps`` optimizer steps.

        Calls ``on_epoch`` for every epoch (in order, a few at a time; the one a step budget ends early comes
        with ``partial=True``), ``on_step`` every time results are read back (at least every
        ``_SYNC_SECONDS``, also inside an epoch), and ``on_checkpoint(epochs_done)`` every ``checkpoint_every``
        epochs, every ``cfg.checkpoint_every_steps`` steps and at the end.
        """
        cfg = self.cfg
        now = time.perf_counter()
        reporter = Reporter(cfg.epochs, cfg.max_steps, cfg.batch_size * cfg.num_steps, self.step)
        run = _Run(on_epoch, on_checkpoint, checkpoint_every, on_step, reporter, now, last_sync=now)
        if self.use_graph and self.graph is None and not self._finished():
            self._capture()
        while not self._finished():
            self._run_epoch(self.epoch + 1, run)
        self.clock.sync()
        train_seconds = time.perf_counter() - run.t_start
        if self.select_best and self.best.state is not None:
            self.model.load_state_dict(self.best.state)
        history = run.history
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
            steps_done=self.step,
            eval_tokens=self._eval_tokens(),
        )

    def _finished(self) -> bool:
        """All epochs done, or the step budget spent."""
        return self.epoch >= self.cfg.epochs or self._budget_spent()

    def _budget_spent(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _begin_epoch(self, epoch: int) -> EpochBatches:
        """Draw the epoch's minibatches and reset (or, resuming inside it, restore) the carried state."""
        cfg = self.cfg
        resume, self._resume = self._resume, None
        if resume is not None and int(resume["epoch"]) == epoch:
            self.rng.setstate(_rng_from_lists(resume["rng_before"]))  # draw the same minibatches again
        else:
            resume = None
        rng_before = _rng_to_lists(self.rng.getstate())
        batches = EpochBatches(self.train_ids, cfg.batch_size, cfg.num_steps, cfg.partition, self.rng)
        zero_state_(self.state)  # the book starts every epoch from a zero state
        self.loss_acc.zero_()
        first = 0
        if resume is not None:
            first = int(resume["batch"])
            saved = resume["state"]
            copy_state_(self.state, tuple(saved) if isinstance(self.state, tuple) else saved[0])
            self.loss_acc.copy_(resume["loss_sum"])
        self._pos = _Position(epoch, first, len(batches), rng_before)
        return batches

    def _run_epoch(self, epoch: int, run: _Run) -> None:
        """Train one epoch (or its rest, or until the step budget is spent), reporting as it goes."""
        cfg = self.cfg
        lr = self.lr_at(epoch)
        self._set_lr(lr)
        batches = self._begin_epoch(epoch)
        pos = self._pos
        assert pos is not None
        first = pos.batch
        run.reporter.begin_epoch(float(self.loss_acc) if first else 0.0, first)
        start = self.clock.mark()
        for i in range(first, pos.batches):
            if self._budget_spent():
                break
            batches.load(i, self.x, self.y)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            self.step += 1
            pos.batch = i + 1
            if pos.batch < pos.batches and not self._budget_spent():  # else the epoch's end reports
                evaluate, checkpoint = self._due_by_steps(run)
                if evaluate or checkpoint or time.perf_counter() - run.last_sync > _SYNC_SECONDS:
                    self._report_inside(run, evaluate, checkpoint)
        end = self.clock.mark()
        done = pos.batch
        tokens = (done - first) * cfg.batch_size * cfg.num_steps
        partial = done < pos.batches
        run.pending.append(
            _Pending(
                epoch, self.loss_acc / done, self.loss_acc.clone(), start, end, tokens, lr, self.step, done, partial
            )
        )
        if not partial:
            self.epoch, self._pos = epoch, None
        self._end_epoch(epoch, partial, run)

    def _due_by_steps(self, run: _Run) -> tuple[bool, bool]:
        """Whether the step just taken is due for a held-out evaluation, and for a checkpoint."""
        evaluate = self.heldout_ids is not None and _every(self.step, self.cfg.eval_every_steps)
        checkpoint = run.on_checkpoint is not None and _every(self.step, self.cfg.checkpoint_every_steps)
        return evaluate, checkpoint

    def _end_epoch(self, epoch: int, partial: bool, run: _Run) -> None:
        """After an epoch (or the part the budget allowed): read back, evaluate, checkpoint when due."""
        cfg = self.cfg
        last = self._finished()
        by_steps_eval, by_steps_checkpoint = self._due_by_steps(run)
        complete = not partial
        evaluate = self.heldout_ids is not None and (
            last or by_steps_eval or (complete and epoch % cfg.eval_every == 0)
        )
        checkpoint = run.on_checkpoint is not None and (
            last
            or by_steps_checkpoint
            or (complete and run.checkpoint_every is not None and epoch % run.checkpoint_every == 0)
        )
        now = time.perf_counter()
        if last or evaluate or checkpoint or epoch % cfg.log_every == 0 or now - run.last_sync > _SYNC_SECONDS:
            stats = self._drain(run, evaluate)
            self._step_report(run, stats[-1].heldout_perplexity, epoch_end=True, loss_sum=run.drained_loss_sum)
            if checkpoint:
                self._checkpoint(run)

    def _report_inside(self, run: _Run, evaluate: bool, checkpoint: bool) -> None:
        """A report inside an epoch: earlier epochs' results, a progress report, an evaluation or checkpoint."""
        if run.pending:
            self._drain(run, evaluate=False)
        loss_sum = float(self.loss_acc)  # syncs with the device
        held = self._heldout_perplexity() if evaluate else None
        self._step_report(run, held, epoch_end=False, loss_sum=loss_sum)
        if checkpoint:
            self._checkpoint(run)

    def _checkpoint(self, run: _Run) -> None:
        self._check_finite_weights(self._pos.epoch if self._pos else self.epoch)  # never save NaN weights
        if run.on_checkpoint is not None:
            run.on_checkpoint(self.epoch)
        run.last_sync = time.perf_counter()

    def _step_report(self, run: _Run, heldout: float | None, epoch_end: bool, loss_sum: float) -> None:
        """Hand the ``StepStats`` of the steps since the previous report to ``on_step``."""
        if self._pos is not None:  # inside an epoch, or at the end of one the budget cut short
            epoch, batch, batches = self._pos.epoch, self._pos.batch, self._pos.batches
        else:
            epoch, batch, batches = self.epoch, run.drained_batches, run.drained_batches
        # A budget's end inside an epoch is reported as inside it: the line says where.
        stats, mean = run.reporter.report(
            self.step, epoch, batch, batches, loss_sum, heldout, epoch_end and self._pos is None
        )
        if mean is not None and not math.isfinite(mean):
            raise TrainingDivergedError(epoch, mean)
        if run.on_step is not None:
            run.on_step(stats)
        run.reporter.restart_window()
        run.last_sync = time.perf_counter()

    def _eval_tokens(self) -> int | None:
        """Held-out tokens a periodic evaluation reads: ``eval_max_tokens``, or the whole split when shorter."""
        if self.heldout_ids is None:
            return None
        n = self.heldout_ids.numel()
        return min(n, self.cfg.eval_max_tokens) if self.cfg.eval_max_tokens is not None else n

    def _heldout_perplexity(self) -> float:
        """Held-out perplexity over the first ``cfg.eval_max_tokens`` held-out tokens (all when unset)."""
        assert self.heldout_ids is not None
        return perplexity(self.model, self.heldout_ids, rows=self.cfg.batch_size, max_tokens=self.cfg.eval_max_tokens)

    def _drain(self, run: _Run, evaluate: bool) -> list[EpochStats]:
        """Read the pending epochs' losses and times back (one sync), check them, evaluate if due, report."""
        pending, run.pending = run.pending, []
        values = torch.stack([t for p in pending for t in (p.loss, p.loss_sum)]).tolist()  # the only sync
        self.clock.sync()
        stats = []
        for k, p in enumerate(pending):
            loss = values[2 * k]
            if not math.isfinite(loss):
                raise TrainingDivergedError(p.epoch, loss)
            seconds = max(self.clock.seconds(p.start, p.end), 1e-9)
            stats.append(
                EpochStats(
                    p.epoch, perplexity_from_loss(loss), p.tokens / seconds, seconds, p.lr, None, p.step, p.partial
                )
            )
        run.drained_loss_sum, run.drained_batches = values[-1], pending[-1].batches
        if evaluate and self.heldout_ids is not None:
            value = self._heldout_perplexity()
            stats[-1].heldout_perplexity = value
            if not stats[-1].partial and (self.best.value is None or value < self.best.value):
                self.best.epoch, self.best.value = stats[-1].epoch, value
                if self.select_best:
                    self.best.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        run.history.extend(stats)
        if run.on_epoch is not None:
            for s in stats:
                run.on_epoch(s)
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
        """Everything beyond the weights needed to continue bit-for-bit: optimizer, RNGs, epoch, steps, best,
        and (taken inside an epoch) the position there: minibatch, the RNG state the epoch was drawn from, the
        carried hidden state and the epoch's loss so far."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "python_rng": _rng_to_lists(self.rng.getstate()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "best_epoch": self.best.epoch,
            "best_value": self.best.value,
            "best_state": {k: v.to("cpu") for k, v in self.best.state.items()} if self.best.state else None,
            "position": self._position_dict(),
        }

    def _position_dict(self) -> dict[str, Any] | None:
        pos = self._pos
        if pos is None or pos.batch in (0, pos.batches):  # at an epoch boundary: nothing to carry
            return None
        state = self.state if isinstance(self.state, tuple) else (self.state,)
        return {
            "epoch": pos.epoch,
            "batch": pos.batch,
            "rng_before": pos.rng_before,
            "state": [t.detach().to("cpu", copy=True) for t in state],
            "loss_sum": self.loss_acc.detach().to("cpu", copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` (the model's weights are loaded separately, before this).

        Trainer states written before steps were counted (no ``step``) resume with the step count at 0.
        """
        if self.graph is not None:
            raise RuntimeError("load the trainer state before training starts")
        self.epoch = int(state["epoch"])
        self.step = int(state.get("step") or 0)
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
        self._resume = state.get("position")  # applied when the next epoch begins (after any graph capture)


def _every(step: int, n: int | None) -> bool:
    """True when ``n`` is set and ``step`` is one of its multiples."""
    return n is not None and step % n == 0


def _rng_to_lists(state: tuple[Any, ...]) -> list[Any]:
    # random.Random's state as plain lists, which torch.load(weights_only=True) accepts.
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_lists(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
