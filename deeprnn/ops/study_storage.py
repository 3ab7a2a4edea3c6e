"""Where a sweep's Optuna study lives, as a flow run may be given it: Prefect keeps and shows a flow run's
parameters, so a storage URL with a password is never one. ``study_storage`` reads it from a Prefect Secret
block (``secret:NAME``) or from ``DEEPRNN_OPTUNA_STORAGE`` in the environment of the process that runs the flow."""

from __future__ import annotations

import os
from typing import Optional

from deeprnn.data.urls import has_password, is_masked, mask_password
from deeprnn.search.optuna_study import DEFAULT_STORAGE, StudyError

STORAGE_ENV = "DEEPRNN_OPTUNA_STORAGE"
SECRET_PREFIX = "secret:"  # a storage parameter "secret:NAME" names the Prefect Secret block holding the URL
# The form refuses a URL whose password is written out (scheme://user:password@...) before the run is created;
# "***", a masked password, passes: the URL then comes from the environment. In the schema only, so that the
# flow's own check (``study_storage``) says why in one line, without echoing the value.
NO_PASSWORD_PATTERN = r"^(?![A-Za-z][A-Za-z0-9+.\-]*://[^/@:?#]*:(?!\*\*\*@)[^@?#]*@)"
PASSWORD_REFUSED = (
    "the study storage holds a password, and Prefect keeps and shows a flow run's parameters: put the URL in a "
    f"Prefect Secret block and give storage {SECRET_PREFIX}BLOCK-NAME, or set {STORAGE_ENV} in the worker's "
    "environment and leave storage empty"
)


def study_storage(storage: Optional[str]) -> str:
    """The study's storage URL from the flow's ``storage`` parameter. Empty: ``DEEPRNN_OPTUNA_STORAGE`` of the
    process that runs the flow, else ``optuna.journal``; ``secret:NAME``: the value of Prefect Secret block
    NAME; a URL with its password masked (``user:***@``): ``DEEPRNN_OPTUNA_STORAGE`` when it holds that URL;
    any other value as given. ``StudyError`` for a URL whose password is written out, a missing block, or a
    masked URL the environment does not hold."""
    if not storage:
        return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if storage.startswith(SECRET_PREFIX):
        from prefect.blocks.system import Secret

        name = storage.removeprefix(SECRET_PREFIX).strip()
        try:
            value = Secret.load(name, validate=False).get()
        except (ValueError, LookupError) as exc:  # Prefect: "Unable to find block document named ..."
            raise StudyError(
                f"no Prefect Secret block {name!r} holding the study storage ({type(exc).__name__}): create it in "
                "the dashboard's Blocks page, or with Secret(value=URL).save(NAME)"
            ) from None
        if not isinstance(value, str) or not value:
            raise StudyError(f"Prefect Secret block {name!r} does not hold a storage URL (a non-empty string)")
        return value
    if is_masked(storage):
        real = os.environ.get(STORAGE_ENV, "")
        if not real or mask_password(real) != storage:
            raise StudyError(
                f"the study storage {storage} has its password masked, and {STORAGE_ENV} in this process's "
                "environment does not hold that URL: set it there, or give the storage as secret:BLOCK-NAME"
            )
        return real
    if has_password(storage):
        raise StudyError(PASSWORD_REFUSED)
    return storage
