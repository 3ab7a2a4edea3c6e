"""URLs as they may be shown: without the user name and password a corpus or tracking URL may carry, or with
a database URL's password masked (``postgresql://deeprnn:***@db-host:5432/optuna``)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# Schemes whose user name may itself be the secret (``https://<token>@host``): masked like a password.
_TOKEN_USER_SCHEMES = ("http", "https")


def redact_url(url: str) -> str:
    """The URL without user name or password, safe for logs, params and tags."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # host[:port] as written, so [IPv6] keeps its brackets
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _userinfo(url: str) -> tuple[str, str | None, str] | None:
    """``(user, password or None, the rest after '@')`` of a ``scheme://user[:password]@...`` URL; None when
    the URL names no user (a path, a journal file, a URL without credentials)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" not in netloc:
        # A database driver reads the password up to its '@', '/' included: scan past the first '/' too.
        netloc = rest.split("?", 1)[0].split("#", 1)[0]
    info, at, _ = netloc.rpartition("@")  # a password may hold '@' (or '/'); the host holds neither
    user, colon, password = info.partition(":")
    if not at or "/" in user:
        return None
    return user, password if colon else None, rest[len(info) + 1 :]


def mask_password(url: str) -> str:
    """The URL with its password shown as ``***``: safe to print, log, and keep as a parameter or tag, and it
    still says which user. A user name alone stays (a database role), but for http(s), where a user name
    alone is usually a token, it is masked too. Anything that is not such a URL comes back as given."""
    found = _userinfo(url)
    if found is None:
        return url
    user, password, tail = found
    scheme = url.partition("://")[0]
    if password is None:
        shown = MASK if scheme.lower() in _TOKEN_USER_SCHEMES else user
    else:
        shown = f"{user}:{MASK}"
    return f"{scheme}://{shown}@{tail}"


def has_password(url: str) -> bool:
    """True when ``url`` carries a password (or, for http(s), a user name that may be a token), masked or not."""
    return mask_password(url) != url or is_masked(url)


def is_masked(url: str) -> bool:
    """True when ``url`` is a masked URL, as ``mask_password`` shows it: its password is ``***``."""
    found = _userinfo(url)
    return found is not None and MASK in (found[0], found[1])


def hide_password(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with ``url`` masked and its password, as written or
    percent-decoded, replaced by ``***`` wherever it appears on its own."""
    found = _userinfo(url)
    if found is None:
        return text
    text = text.replace(url, mask_password(url))
    secrets = {s for s in (found[1], found[1] and unquote(found[1])) if s and s != MASK}
    if found[1] is None and mask_password(url) != url:  # an http(s) token in the user name
        secrets.add(found[0])
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
