"""The MLflow pyfunc model, logged from code: a text prefix in, the generated continuation out.

MLflow copies this file into the logged model and runs it at load time; ``set_model`` at the bottom tells
MLflow which object serves. The checkpoint is the model's artifact; the ``deeprnn`` package travels with
it as code. Loading uses ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class DeepRNNLanguageModel(PythonModel):
    """Continue each ``prefix``; params ``num_chars``, ``temperature`` (0: greedy), ``top_k`` (0: off), ``seed``."""

    def load_context(self, context: Any) -> None:
        """Rebuild the model and vocabulary from the checkpoint artifact (CPU unless DEEPRNN_DEVICE says)."""
        from deeprnn import checkpoint
        from deeprnn.device import resolve_device

        device = resolve_device(os.environ.get("DEEPRNN_DEVICE", "cpu"))
        data = checkpoint.load(context.artifacts["checkpoint"])
        self.model, self.vocab, self.config = checkpoint.restore_model(data, device)

    # No type hints on predict: MLflow would derive a second signature from them; ours is given explicitly.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Generate one continuation per row of the ``prefix`` column (or per string of a list)."""
        from deeprnn.generate import generate

        params = params or {}
        if hasattr(model_input, "columns"):
            column = "prefix" if "prefix" in model_input.columns else model_input.columns[0]
            prefixes = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prefixes = [model_input]
        else:
            prefixes = [str(p) for p in model_input]
        temperature = float(params.get("temperature") or 0.0)
        top_k = int(params.get("top_k") or 0)
        return [
            generate(
                self.model,
                self.vocab,
                prefix,
                int(params.get("num_chars", 50)),
                token=self.config.data.token,
                temperature=temperature if temperature > 0 else None,
                top_k=top_k if top_k > 0 else None,
                seed=int(params.get("seed", 0)),
            )
            for prefix in prefixes
        ]


mlflow.models.set_model(DeepRNNLanguageModel())
