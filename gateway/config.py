"""`GatewayConfig`: every setting of `kiln gateway` (and of the gateway `kiln serve --gateway-port` starts)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GatewayConfig:
    target: str = "127.0.0.1:50051"
    """The Kiln gRPC server (HOST:PORT) every request is sent to."""
    target_tls_ca: str = ""
    """The gRPC server speaks TLS (`kiln serve --tls-cert`): PEM CA bundle its certificate chains to."""
    target_tls_cert: str = ""
    """PEM client certificate for a server that requires one (mutual TLS), with `target_tls_key`."""
    target_tls_key: str = ""
    """PEM private key of `target_tls_cert`."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = 7861
    """HTTP port; 0 picks a free one (logged)."""
    cors_allow_origins: tuple[str, ...] = ()
    """Origins browsers may call the API from (`*` for any); empty: same origin only."""
    api_auth: dict[str, str] = field(default_factory=dict)
    """AUTOMATIC1111's `--api-auth`: basic-auth `user:password` pairs, each mapped to the API key it stands for
    (`user:password=KEY`). Without a mapping a basic-auth password is taken as the API key itself."""
    max_body_bytes: int = 24 << 20
    """Largest request body accepted (base64 images included); larger bodies get 413."""
    preview_every: int = 1
    """Denoising steps between the previews the gateway asks for on AUTOMATIC1111 and OpenAI requests, which
    `/sdapi/v1/progress` shows (0: none). `/v1/generate` sends the request's own `preview_every`."""
    preview_watch_s: float = 120.0
    """AUTOMATIC1111 and OpenAI routes ask the server for previews only for a client that polled
    `/sdapi/v1/progress` for images within this many seconds, and for step events only for one that polled it at
    all (else `omit_progress`), so no work is spent on what nobody looks at (0: both for every request)."""
    insecure_open: bool = False
    """Allow a non-loopback `host` in front of a gRPC server without accounts (anyone who reaches the gateway
    could generate for free); without it the gateway refuses to start there, as `kiln serve` does."""
    timeout_s: float = 600.0
    """Deadline of one generation on the gRPC server."""
    models_ttl_s: float = 5.0
    """How long the server's model list is reused before it is asked again."""
    image_url_ttl_s: float = 3600.0
    """OpenAI Images API, `response_format=url`: how long a returned URL serves its PNG (OpenAI's last an hour)."""
    image_store_bytes: int = 256 << 20
    """Memory the gateway keeps those PNGs in; when full, the least recently fetched go first (their URLs 404)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be between 0 and 65535")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} must be at least 1024")
        if self.preview_every < 0:
            raise ValueError(f"preview_every={self.preview_every} must be 0 (no previews) or more")
        if self.preview_watch_s < 0:
            raise ValueError(f"preview_watch_s={self.preview_watch_s} must be 0 (previews for every request) or more")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be more than 0")
        if self.image_url_ttl_s <= 0:
            raise ValueError(f"image_url_ttl_s={self.image_url_ttl_s} must be more than 0")
        if self.image_store_bytes < 1 << 20:
            raise ValueError(f"image_store_bytes={self.image_store_bytes} must be at least {1 << 20} (1 MiB)")
        if bool(self.target_tls_cert) != bool(self.target_tls_key):
            raise ValueError("a client certificate needs both target_tls_cert and target_tls_key")
        if self.target_tls_cert and not self.target_tls_ca:
            raise ValueError("target_tls_cert needs target_tls_ca (the CA the server's certificate chains to)")
        if ":" not in self.target:
            raise ValueError(f"target={self.target!r} must be HOST:PORT")

    @staticmethod
    def parse_api_auth(text: str) -> dict[str, str]:
        """`user:pass=KEY,user2:pass2=KEY2` (or `user:pass` alone, whose password is then the key)."""
        out: dict[str, str] = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            cred, _, key = item.partition("=")
            user, sep, password = cred.partition(":")
            if not sep or not user or not password:
                raise ValueError(f"--api-auth entry {item!r} must be USER:PASSWORD[=API_KEY]")
            out[cred] = key or password
        return out
