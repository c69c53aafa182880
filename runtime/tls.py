"""TLS for the gRPC port: the server's certificate (and, for mutual TLS, the CA its clients' certificates must
chain to), and a client's trust (a CA file, else the system's roots) and optional client certificate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}={str(path)!r} cannot be read: {e.strerror}") from None


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    """PEM certificate chain the server presents (`--tls-cert`)."""
    key: Path
    """PEM private key of that certificate (`--tls-key`)."""
    client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS, `--tls-client-ca`)."""

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "tls_key"), _read(self.cert, "tls_cert"))
        ca = _read(self.client_ca, "tls_client_ca") if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTls:
    ca: Path | None = None
    """PEM CA bundle the server's certificate must chain to (`--tls-ca`); None: the system's roots."""
    cert: Path | None = None
    """PEM client certificate for servers that require one (`--tls-cert`, with `--tls-key`)."""
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "tls_ca") if self.ca else None,
            private_key=_read(self.key, "tls_key") if self.key else None,
            certificate_chain=_read(self.cert, "tls_cert") if self.cert else None)
