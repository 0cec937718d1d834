"""TLS for the migration stream: QEMU's ``tls-creds-x509`` object, from the directory
the config names (``migration_tls_x509_dir``).

The target's QEMU is the TLS server, the source's the client; both verify the peer's
certificate against ``ca-cert.pem``. The source checks the server's certificate
against the address it connects to (QEMU takes the host of the ``tcp:`` URI), so the
server certificate must name the target's migration address (a subjectAltName
``IP:`` entry for an address).
"""

from __future__ import annotations

import os
from typing import Any, Final, Literal

__all__ = ["TLS_CREDS_ID", "Endpoint", "missing_x509_files", "tls_creds_object"]

#: The id of the credentials object in QEMU (``tls-creds`` names it).
TLS_CREDS_ID: Final = "kvs-migration-tls"

Endpoint = Literal["server", "client"]


def _files(endpoint: Endpoint) -> tuple[str, ...]:
    return ("ca-cert.pem", f"{endpoint}-cert.pem", f"{endpoint}-key.pem")


def missing_x509_files(directory: str, endpoint: Endpoint) -> list[str]:
    """The files `endpoint` needs that are not regular files in `directory`."""
    return [name for name in _files(endpoint) if not os.path.isfile(os.path.join(directory, name))]


def tls_creds_object(directory: str, endpoint: Endpoint) -> dict[str, Any]:
    """``object-add`` arguments of the credentials of `endpoint`, verifying the peer."""
    return {
        "qom-type": "tls-creds-x509",
        "id": TLS_CREDS_ID,
        "dir": directory,
        "endpoint": endpoint,
        "verify-peer": True,
    }
