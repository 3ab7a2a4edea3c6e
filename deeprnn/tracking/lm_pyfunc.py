"""The MLflow pyfunc model, logged from code: text prefixes in, their generated continuations out.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the bottom tells
MLflow which object serves. The checkpoint is the model's artifact; the ``deeprnn`` package travels with
it as code. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.

A request's params and prefixes are checked against the configuration's bounds before any work, and so is
its total work (``deeprnn.generate.MAX_REQUEST_TOKENS``: over its prefixes, their tokens plus ``num_chars``
each); what is refused raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve``
answers with HTTP 400 and the message, without a traceback. All prefixes of a request are generated as one
batch.

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
import os
import sys
import time
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

REQUEST_SHARE = 0.8  # of the server's request timeout: our limit ends the work before the server gives up
RELEASE_AFTER_TOKENS = 100_000  # a request this large hands its memory back to the system afterwards
SERVER_TIMEOUT_SECONDS = 60.0  # MLflow's default for MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT


def request_seconds() -> float:
    """How long one request may generate: ``DEEPRNN_REQUEST_SECONDS``, else ``REQUEST_SHARE`` of the server's
    request timeout."""
    if os.environ.get("DEEPRNN_REQUEST_SECONDS"):
        return float(os.environ["DEEPRNN_REQUEST_SECONDS"])
    server = float(os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT") or SERVER_TIMEOUT_SECONDS)
    return REQUEST_SHARE * server


M_ARENA_MAX = -8  # mallopt(3): how many memory pools the C allocator may make


def few_memory_pools() -> None:
    """Let the C allocator keep two memory pools instead of one per thread (eight per core): the server runs
    each request in a thread of a pool, and memory freed in one thread's pool is never handed back while
    another thread's pool holds the pages around it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)


def release_memory() -> None:
    """Hand the memory a request used back to the system: the C allocator keeps freed memory for reuse, so a
    burst of large requests would leave the server at its peak for good."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _prefixes(model_input: Any) -> list[Any]:
    """The request's prefixes: the ``prefix`` column (else the first), a list, or one string; empty when
    the request gives none (no column, no rows, None)."""
    if model_input is None:
        return []
    if hasattr(model_input, "columns"):
        if len(model_input.columns) == 0:
            return []
        column = "prefix" if "prefix" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


class DeepRNNLanguageModel(PythonModel):
    """Continue each ``prefix`` (none given: the model's own sample prefixes), normalized by the rule its
    corpus went through; params ``num_chars``, ``temperature`` (0: greedy), ``top_k`` (0: off), ``seed``."""

    def load_context(self, context: Any) -> None:
        """Rebuild the model and vocabulary from the checkpoint artifact, on the best device here (CUDA,
        then MPS, then CPU) unless ``DEEPRNN_DEVICE`` names one."""
        from deeprnn.device import resolve_device
        from deeprnn.training import checkpoint

        few_memory_pools()
        device = resolve_device(os.environ.get("DEEPRNN_DEVICE", "auto"))
        data = checkpoint.load(context.artifacts["checkpoint"])
        self.model, self.vocab, self.config = checkpoint.restore_model(data, device)

    # A DataFrame hint is one MLflow infers no schema from (the signature is given explicitly when the model is
    # logged), and with it MLflow does not warn that predict() has no type hints. Served and loaded models
    # receive a DataFrame; a list or a string works when called directly.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Generate one continuation per row of the ``prefix`` column (or per string of a list), as one batch."""
        from deeprnn.generate import (
            GenerationRequestError,
            GenerationTimeoutError,
            check_params,
            check_prefixes,
            check_work,
            generate_batch,
        )

        token, rule = self.config.data.token, self.config.data.normalize
        # No prefix in the request: the prefixes the model was trained with (its run's samples).
        given = _prefixes(model_input) or list(self.config.sample.prefixes)
        try:  # everything is checked before the first forward step
            settings = check_params(params)
            prefixes = check_prefixes(given, self.vocab, token, normalize=rule)  # as the corpus's rule writes them
            work = check_work(prefixes, settings["num_chars"], token)
        except GenerationRequestError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        limit = request_seconds()
        try:
            return generate_batch(
                self.model,
                self.vocab,
                prefixes,
                settings["num_chars"],
                token=token,
                temperature=settings["temperature"],
                top_k=settings["top_k"],
                seed=settings["seed"],
                deadline=time.monotonic() + limit,
            )
        except GenerationTimeoutError:
            raise MlflowException(
                f"generation stopped after {limit:.0f} s, this server's limit per request: send fewer or shorter "
                "prefixes, or a smaller num_chars",
                error_code=DEADLINE_EXCEEDED,
            ) from None
        finally:
            if work > RELEASE_AFTER_TOKENS:  # small requests reuse what the allocator keeps
                release_memory()


mlflow.models.set_model(DeepRNNLanguageModel())
