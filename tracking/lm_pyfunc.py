"""The MLflow pyfunc model, logged from code: text prefixes in, their generated continuations out.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the bottom tells
MLflow which object serves. The checkpoint is the model's artifact; the ``deeprnn`` package travels with
it as code. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.

A request's params and prefixes are checked against the configuration's bounds before any work; what is
refused raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with
HTTP 400 and the message, without a traceback. All prefixes of a request are generated as one batch.
A request without prefixes continues the ones the model was trained with (``config.sample.prefixes``), and
every prefix is first written as the corpus's normalization rule wrote the training text.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


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
        from deeprnn import checkpoint
        from deeprnn.device import resolve_device

        device = resolve_device(os.environ.get("DEEPRNN_DEVICE", "auto"))
        data = checkpoint.load(context.artifacts["checkpoint"])
        self.model, self.vocab, self.config = checkpoint.restore_model(data, device)

    # A DataFrame hint is one MLflow infers no schema from (the signature is given explicitly when the model is
    # logged), and with it MLflow does not warn that predict() has no type hints. Served and loaded models
    # receive a DataFrame; a list or a string works when called directly.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Generate one continuation per row of the ``prefix`` column (or per string of a list), as one batch."""
        from deeprnn.generate import GenerationRequestError, check_params, check_prefixes, generate_batch

        token, rule = self.config.data.token, self.config.data.normalize
        # No prefix in the request: the prefixes the model was trained with (its run's samples).
        given = _prefixes(model_input) or list(self.config.sample.prefixes)
        try:  # everything is checked before the first forward step
            settings = check_params(params)
            prefixes = check_prefixes(given, self.vocab, token, normalize=rule)  # as the corpus's rule writes them
        except GenerationRequestError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return generate_batch(
            self.model,
            self.vocab,
            prefixes,
            settings["num_chars"],
            token=token,
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            seed=settings["seed"],
        )


mlflow.models.set_model(DeepRNNLanguageModel())
