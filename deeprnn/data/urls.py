"""URLs as they may be shown: without the user name and password a corpus or tracking URL may carry."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL without user name or password, safe for logs, params and tags."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # host[:port] as written, so [IPv6] keeps its brackets
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
