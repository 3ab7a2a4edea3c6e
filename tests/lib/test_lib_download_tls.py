"""deeprnn.data.download verifies TLS: a real HTTPS server on 127.0.0.1 with a certificate nobody vouches for is
refused, clearly and at once, and nothing is cached."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from deeprnn.data.download import DownloadError, TransientDownloadError, fetch_corpus

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: valid in form, trusted by no one."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture()
def https_url(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """``https://127.0.0.1:PORT/corpus.txt`` served with a self-signed certificate; and the paths requested."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            hits.append(self.path)
            body = b"the time traveller\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/corpus.txt", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_an_untrusted_certificate_is_refused_at_once_and_nothing_is_cached(
    https_url: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, hits = https_url
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=f"TLS verification failed for {url}") as info:
        fetch_corpus(url.replace("https://", "https://reader:s3cret@"), None, cache=cache)
    assert not isinstance(info.value, TransientDownloadError)  # not a network hiccup: no retry would help
    assert "s3cret" not in str(info.value)
    assert hits == []  # the handshake failed: the request was never sent
    assert not cache.exists() or not any(cache.iterdir())
