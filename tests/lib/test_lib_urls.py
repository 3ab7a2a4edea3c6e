"""URLs as deeprnn shows them: a database URL's password masked, its user kept; a token in an http(s) user name
masked; paths, journal files and URLs without credentials unchanged; a password cut out of any text."""

from __future__ import annotations

import pytest

from deeprnn.data.urls import has_password, hide_password, is_masked, mask_password


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://deeprnn:s3cret@db-host:5432/optuna", "postgresql://deeprnn:***@db-host:5432/optuna"),
        (
            "postgresql+psycopg://u:p%40ss@db/optuna?sslmode=require",
            "postgresql+psycopg://u:***@db/optuna?sslmode=require",
        ),
        ("mysql+pymysql://u:pa/ss@db/optuna", "mysql+pymysql://u:***@db/optuna"),  # a driver reads '/' as password
        ("postgresql://u:p@ss@db/optuna", "postgresql://u:***@db/optuna"),  # '@' in the password, not encoded
        ("mysql://:pw@db/optuna", "mysql://:***@db/optuna"),
        ("https://u:pw@mlflow.example.com", "https://u:***@mlflow.example.com"),
        ("https://ghp_token@host/x", "https://***@host/x"),  # a user name alone over http(s) is a token
        ("postgresql://deeprnn@db/optuna", "postgresql://deeprnn@db/optuna"),  # a role name alone stays
        ("http://u:p@[::1]:8080/t", "http://u:***@[::1]:8080/t"),
        ("http://host/a@b/c", "http://host/a@b/c"),
        ("postgresql://db:5432/optuna?application_name=a@b", "postgresql://db:5432/optuna?application_name=a@b"),
        ("sqlite:////tmp/x@y/studies.db", "sqlite:////tmp/x@y/studies.db"),
        ("runs/a@b/optuna.journal", "runs/a@b/optuna.journal"),
        ("postgresql://deeprnn:***@db/optuna", "postgresql://deeprnn:***@db/optuna"),
    ],
)
def test_mask_password(url: str, shown: str) -> None:
    assert mask_password(url) == shown
    assert mask_password(shown) == shown  # masking twice changes nothing
    assert has_password(url) == (shown != url or is_masked(url))


def test_is_masked_only_for_a_masked_password() -> None:
    assert is_masked("postgresql://deeprnn:***@db/optuna")
    assert not is_masked("postgresql://deeprnn:s3cret@db/optuna") and not is_masked("optuna.journal")


def test_hide_password_cuts_it_out_of_any_text() -> None:
    url = "postgresql://deeprnn:s3%40cret@db/optuna"
    text = f"cannot connect to {url}: password 's3@cret' refused; retry with s3%40cret"
    hidden = hide_password(text, url)
    assert "s3" not in hidden and "postgresql://deeprnn:***@db/optuna" in hidden
    assert hide_password("nothing secret", "optuna.journal") == "nothing secret"
