"""Throwaway certificates for TLS tests, made at test time with the ``openssl`` command.

A CA, a server certificate for ``localhost``, ``model.test`` and 127.0.0.1 signed by it, a
client certificate signed by it (for mutual TLS), and a second, unrelated CA (the "wrong"
bundle). Elliptic-curve keys, so the whole set takes a fraction of a second. Nothing is
committed: each test session makes its own in a temporary folder.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_NAMES = ("localhost", "model.test")
"""The server certificate's DNS names (besides the address 127.0.0.1)."""


@dataclass(frozen=True)
class Certs:
    ca: Path
    """The CA that signed the server and client certificates."""
    other_ca: Path
    """A CA that signed nothing here: verifying the server with it fails."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """The model server's side: its certificate, and with ``require_client_cert`` a
        client certificate from :attr:`ca` demanded."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca)
        return context


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                   timeout=30)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions + "\nbasicConstraints=CA:FALSE\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=folder)
    return cert, key


def make_certs(folder: Path) -> Certs:
    """Make the whole set in ``folder``."""
    ca = _ca(folder, "test-ca")
    other = _ca(folder, "other-ca")
    names = ",".join(f"DNS:{n}" for n in SERVER_NAMES)
    server = _leaf(folder, "server", ca, f"subjectAltName={names},IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth")
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth")
    return Certs(ca=ca[0], other_ca=other[0], server_cert=server[0], server_key=server[1],
                 client_cert=client[0], client_key=client[1])


def certs_for_session(factory: pytest.TempPathFactory) -> Certs:
    """One set of test certificates in a fresh temporary folder (the test is skipped
    without ``openssl``); a test module's session-scoped ``certs`` fixture calls it."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_certs(factory.mktemp("certs"))
