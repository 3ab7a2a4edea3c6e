"""deeprnn: deep recurrent language models (D2L 9.3) as scheduled, tracked Prefect and MLflow pipelines.

The library, which imports neither Prefect nor MLflow, is one module or folder per stage: ``data`` (download,
normalization, vocabulary, the token cache, batching), ``model``, ``training``, ``evaluate``, ``generate`` and
``search``, configured by ``config`` and ``presets``, sized to a text by ``sizing`` and composed by ``pipeline``.

Around it, each layer imports only those below it: ``cli`` (the ``deeprnn`` command) > ``flows`` (Prefect
flows) > ``tasks`` (Prefect tasks) > ``ops`` (Prefect operations) > ``tracking`` (the MLflow adapter) > the
library.
"""
