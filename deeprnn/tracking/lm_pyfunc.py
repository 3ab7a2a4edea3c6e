"""The MLflow pyfunc model, logged from code: text prefixes in, their generated continuations out.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the bottom tells
MLflow which object serves. The checkpoint is the model's artifact; the ``deeprnn`` package travels with
it as code. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.

A request's params and prefixes are checked against the configuration's bounds before any work, and so is
its total work (``deeprnn.generate.MAX_REQUEST_TOKENS``: over its prefixes, their tokens plus ``num_tokens``
each) and its time: loading times this model's generation on this machine (``measure_speed``; a refusal on
figures older than ``MEASURE_AGAIN_AFTER`` times it again in the background, keeping the faster figures), and a
request whose estimate is above ``fit_share()`` of its time limit is refused. What is refused raises
``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with HTTP 400 and the
message, without a traceback. All prefixes of a request are generated as one batch.

A request stops at a time limit below the server's own (``REQUEST_SHARE`` of
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, or ``DEEPRNN_REQUEST_SECONDS``): the server answers a request that
runs past its timeout with 504 but leaves its work running in a thread, holding a core and its memory. Ours
stops the work, answers 504 with a message, and hands the memory back to the system.

A request without prefixes continues the ones the model was trained with (``config.sample.prefixes``), and
every prefix is first written as the corpus's normalization rule wrote the training text.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from deeprnn.generate import GenerationSpeed, Token

REQUEST_SHARE = 0.8  # of the server's request timeout: our limit ends the work before the server gives up
RELEASE_AFTER_TOKENS = 100_000  # a request this large hands its memory back to the system afterwards
SERVER_TIMEOUT_SECONDS = 60.0  # MLflow's default for MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
# Of a request's time limit, what its estimate may fill: the rest is for a machine busier than when it was measured.
FIT_SHARE = 0.5
# A refusal measures the speed again, in the background, when the figures are older than this (seconds): a
# moment of load while they were taken does not refuse work for the server's whole life.
MEASURE_AGAIN_AFTER = 10.0

log = logging.getLogger("deeprnn.serving")


def request_limit() -> tuple[float, str]:
    """How long one request may generate, and that limit in words for a message: ``DEEPRNN_REQUEST_SECONDS``,
    else ``REQUEST_SHARE`` of the server's request timeout."""
    if os.environ.get("DEEPRNN_REQUEST_SECONDS"):
        seconds = float(os.environ["DEEPRNN_REQUEST_SECONDS"])
        return seconds, f"its {_secs(seconds)} s limit per request (DEEPRNN_REQUEST_SECONDS)"
    timeout = float(os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT") or SERVER_TIMEOUT_SECONDS)
    return REQUEST_SHARE * timeout, f"its {_secs(timeout)} s timeout"


def fit_share() -> float | None:
    """How much of a request's time limit its estimate may fill: ``DEEPRNN_REQUEST_FIT`` (above 0, at most 1;
    ``off``: no estimate, the time limit alone stops what runs over), else ``FIT_SHARE``."""
    raw = os.environ.get("DEEPRNN_REQUEST_FIT", "").strip()
    if not raw:
        return FIT_SHARE
    if raw.lower() == "off":
        return None
    with contextlib.suppress(ValueError):
        if 0 < (share := float(raw)) <= 1:
            return share
    raise ValueError(f"DEEPRNN_REQUEST_FIT={raw!r}: a share of the time limit above 0 and at most 1, or off")


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:,.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


M_ARENA_MAX = -8  # mallopt(3): how many memory pools the C allocator may make


def release_memory() -> None:
    """Hand the memory a request used back to the system: the C allocator keeps freed memory for reuse, so a
    burst of large requests would leave the server at its peak for good."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # no glibc (not Linux, or musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _prefixes(model_input: Any) -> list[Any]:
    """The request's prefixes: the ``prefix`` column (else the first), a list, or one string; empty when
    the request gives none (no column, no rows, None)."""
    if isinstance(model_input, str):
        return [model_input]
    columns = list(getattr(model_input, "columns", []))
    if columns:
        return list(model_input["prefix" if "prefix" in columns else columns[0]])
    return [] if model_input is None else list(model_input)  # a frame without columns lists none


def _say_speed(speed: GenerationSpeed, device: str, took: float, share: float, again: bool) -> None:
    """One line with the figures in use, in the server's log (to stderr when MLflow's scoring server settings
    are in the environment)."""
    if "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in os.environ and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    (greedy_1, greedy_n), (sampled_1, sampled_n), (warm_1, warm_n) = (
        map(_ms, pair) for pair in (speed.greedy, speed.sampled, speed.warm)
    )
    limit, limit_text = request_limit()
    log.info(
        f"generation speed on {device}, measured {'again (the faster figures kept) ' if again else ''}in "
        f"{_secs(took)} s: a token {greedy_1} at 1 row, {greedy_n} at {speed.rows} rows (sampling: {sampled_1}, "
        f"{sampled_n}); a prefix's warm-up {warm_1} a token at 1 row, {warm_n} at {speed.rows} rows; a request may "
        f"take about {_secs(share * limit)} s of generation, within {limit_text}"
    )


class DeepRNNLanguageModel(PythonModel):
    """Continue each ``prefix`` (none given: the model's own sample prefixes), normalized by the rule its
    corpus went through; params ``num_tokens``, ``temperature`` (0: greedy), ``top_k`` (0: off), ``seed``."""

    def load_context(self, context: Any) -> None:
        """Rebuild the model and vocabulary from the checkpoint artifact, on the best device here (CUDA,
        then MPS, then CPU) unless ``DEEPRNN_DEVICE`` names one."""
        from deeprnn.device import resolve_device
        from deeprnn.training import checkpoint

        # Two memory pools for the C allocator instead of one per thread (eight per core): the server runs each
        # request in a thread of a pool, and memory freed in one thread's pool is never handed back while
        # another thread's pool holds the pages around it.
        with contextlib.suppress(OSError, AttributeError):  # no glibc: the allocator as it is
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)
        device = resolve_device(os.environ.get("DEEPRNN_DEVICE", "auto"))
        data = checkpoint.load(context.artifacts["checkpoint"])
        self.model, self.vocab, self.config = checkpoint.restore_model(data, device)
        self.device, self.speed, self.measured_at = device, None, 0.0
        self.share = fit_share()  # a wrong setting stops the server's start, before the measurement
        self._measuring = threading.Lock()
        self._measure()  # none with DEEPRNN_REQUEST_FIT=off

    def _measure(self) -> None:
        """Time this model's generation here (again: keeping the faster of each figure); one at a time."""
        from deeprnn.generate import MAX_PREFIXES, measure_speed

        if self.share is None or not self._measuring.acquire(blocking=False):
            return
        try:
            self.measured_at = started = time.monotonic()
            speed = measure_speed(self.model, rows=MAX_PREFIXES)
            again = self.speed is not None
            self.speed = self.speed.faster(speed) if self.speed is not None else speed
            _say_speed(self.speed, self.device.type, time.monotonic() - started, self.share, again)
        finally:
            self._measuring.release()

    def _check_time(self, prefixes: list[str], num_tokens: int, token: Token, sampled: bool) -> None:
        """``GenerationRequestError`` when the request's estimated time (by the speed measured here) is above
        ``share`` of its time limit, naming both and the most the request's prefixes may ask for. A refusal on
        figures older than ``MEASURE_AGAIN_AFTER`` starts a new measurement in the background, for the
        requests that follow."""
        from deeprnn.generate import GenerationRequestError, split_prefix

        if self.speed is None or self.share is None:
            return  # DEEPRNN_REQUEST_FIT=off
        lengths = [len(split_prefix(p, token)) for p in prefixes]
        limit, limit_text = request_limit()
        asked, fits = self.speed.seconds(lengths, num_tokens, sampled), self.share * limit
        if asked <= fits:
            return
        if time.monotonic() - self.measured_at > MEASURE_AGAIN_AFTER:
            threading.Thread(target=self._measure, name="deeprnn-measure-speed", daemon=True).start()
        unit = "character" if token == "char" else "word"
        most = self.speed.tokens_within(lengths, fits, sampled)
        todo = f"{len(prefixes):,} prefixes: at most about {most:,} {unit}s each"
        if not most:
            todo = "their warm-up alone takes longer: fewer or shorter prefixes"
        raise GenerationRequestError(
            f"this request asks for about {_secs(asked)} s of generation ({len(prefixes):,} prefixes x "
            f"{num_tokens:,} {unit}s{', sampled' if sampled else ''}); at the speed this server measured, it does "
            f"about {_secs(fits)} s a request within {limit_text}: send fewer prefixes or {unit}s per request "
            f"({todo})"
        )

    # A DataFrame hint is one MLflow infers no schema from (the signature is given explicitly when the model is
    # logged), and with it MLflow does not warn that predict() has no type hints. Served and loaded models
    # receive a DataFrame; a list or a string works when called directly.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Generate one continuation per row of the ``prefix`` column (or per string of a list), as one batch."""
        from deeprnn import generate

        token, rule = self.config.data.token, self.config.data.normalize
        # No prefix in the request: the prefixes the model was trained with (its run's samples).
        given = _prefixes(model_input) or list(self.config.sample.prefixes)
        try:  # everything is checked before the first forward step
            settings = generate.check_params(params)  # num_tokens, and temperature, top_k and seed as generated
            num_tokens = settings.pop("num_tokens")
            prefixes = generate.check_prefixes(given, self.vocab, token, normalize=rule)  # as the corpus's rule has it
            work = generate.check_work(prefixes, num_tokens, token)
            self._check_time(prefixes, num_tokens, token, settings["temperature"] is not None)
        except generate.GenerationRequestError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        limit = request_limit()[0]
        try:
            return generate.generate_batch(
                self.model, self.vocab, prefixes, num_tokens, token=token, deadline=time.monotonic() + limit, **settings
            )
        except generate.GenerationTimeoutError:
            raise MlflowException(
                f"generation stopped after {limit:.0f} s, this server's limit per request: send fewer or shorter "
                "prefixes, or a smaller num_tokens",
                error_code=DEADLINE_EXCEEDED,
            ) from None
        finally:
            if work > RELEASE_AFTER_TOKENS:  # small requests reuse what the allocator keeps
                release_memory()


mlflow.models.set_model(DeepRNNLanguageModel())
