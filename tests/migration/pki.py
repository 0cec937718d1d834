"""Test certificates for TLS migrations, made with the ``openssl`` command.

`x509_dir` writes the five files QEMU's ``tls-creds-x509`` object reads from a
directory (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
``client-cert.pem``, ``client-key.pem``), signed by a CA of its own: two directories
made with different CAs do not trust each other.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: Where the migration stream goes in the tests: the server certificate names it.
SUBJECT_ALT_NAME = "subjectAltName=IP:127.0.0.1,DNS:localhost"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _signed(directory: Path, role: str, extension: str) -> None:
    key, request = directory / f"{role}-key.pem", directory / f"{role}.csr"
    _openssl("genrsa", "-out", key, "2048")
    _openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN=kvs-test-{role}")
    extensions = directory / f"{role}.ext"
    extensions.write_text(f"{extension}\n")
    _openssl(
        "x509", "-req", "-in", request, "-CA", directory / "ca-cert.pem",
        "-CAkey", directory / "ca-key.pem", "-CAcreateserial", "-days", "2",
        "-out", directory / f"{role}-cert.pem", "-extfile", extensions,
    )  # fmt: skip
    request.unlink()
    extensions.unlink()


def x509_dir(directory: Path) -> Path:
    """`directory` with a fresh CA and a server and a client certificate it signed."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (Debian package openssl)")
    directory.mkdir(parents=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", directory / "ca-key.pem", "-out", directory / "ca-cert.pem",
        "-subj", "/CN=kvs-test-ca",
    )  # fmt: skip
    _signed(directory, "server", f"{SUBJECT_ALT_NAME}\nextendedKeyUsage=serverAuth")
    _signed(directory, "client", "extendedKeyUsage=clientAuth")
    return directory
