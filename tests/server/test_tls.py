"""TLS on the gRPC port with a CA and certificates made in the test (`cryptography`): a TLS server refuses
plaintext and serves `kiln generate --tls-ca`; mutual TLS refuses clients without a certificate its CA signed;
the HTTP gateway reaches a TLS server (`--target-tls-ca`), beside it in `kiln serve` too."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from runtime.tls import ClientTls
from tests.conftest import ROOT, ServerProcess, free_port, kiln, start_server
from tests.gateway.conftest import start_gateway, wait_http


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path.with_suffix(".pem"), path.with_suffix(".key")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate from another CA."""
    stranger_key: Path


def _ca(folder: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    _write(folder / name, key, cert)
    return key, cert


def _leaf(folder: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
          server: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca[1].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(folder / name, key, builder.sign(ca[0], hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "kiln-test-ca")
    server = _leaf(folder, "server", ca, server=True)
    client = _leaf(folder, "client", ca, server=False)
    stranger = _leaf(folder, "stranger", _ca(folder, "other-ca"), server=False)
    return Pki(folder / "kiln-test-ca.pem", *server, *client, *stranger)


def _list(target: str, tls: ClientTls | None) -> grpc.StatusCode:
    try:
        with channel(target, tls) as ch:
            pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_tls_server(pki: Pki, tiny_store: Path, tmp_path: Path) -> None:
    server = start_server_tls(tiny_store, tmp_path, pki, "--tls-cert", str(pki.server_cert), "--tls-key",
                              str(pki.server_key), "--metrics-port", "0")
    try:
        assert "(TLS)" in server.log()
        metrics = re.search(r"metrics on (https://127\.0\.0\.1:\d+/metrics)", server.log())
        assert metrics, server.log()  # the metrics port speaks TLS with the same certificate
        assert "kiln_requests_total" in httpx.get(metrics.group(1), verify=str(pki.ca), timeout=10).text
        with pytest.raises(httpx.HTTPError):
            httpx.get(metrics.group(1).replace("https", "http"), timeout=10)
        assert _list(server.target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext is refused
        assert _list(server.target, ClientTls(ca=pki.ca)) == grpc.StatusCode.OK
        out = kiln("generate", "--target", server.target, "--tls-ca", str(pki.ca), "--model", "tiny", "--prompt",
                   "a red circle", "--steps", "2", "--quiet", "--out", str(tmp_path / "a.png"))
        assert out.returncode == 0 and (tmp_path / "a.png").stat().st_size > 0, out.stderr
        assert kiln("wait", "--target", server.target, "--tls-ca", str(pki.ca), "--timeout", "10").returncode == 0
        # the gateway in front of it, over TLS
        gateway = start_gateway(server.target, tmp_path / "gateway.log", "--target-tls-ca", str(pki.ca))
        try:
            r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 3}, timeout=60)
            assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [3]
        finally:
            gateway.stop()
    finally:
        server.stop()


def test_mutual_tls(pki: Pki, tiny_store: Path, tmp_path: Path) -> None:
    server = start_server_tls(tiny_store, tmp_path, pki, "--tls-cert", str(pki.server_cert), "--tls-key",
                              str(pki.server_key), "--tls-client-ca", str(pki.ca))
    try:
        assert "mutual TLS" in server.log()
        assert _list(server.target, ClientTls(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        stranger = ClientTls(ca=pki.ca, cert=pki.stranger_cert, key=pki.stranger_key)
        assert _list(server.target, stranger) == grpc.StatusCode.UNAVAILABLE  # another CA's certificate
        assert _list(server.target, ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) == \
            grpc.StatusCode.OK
        out = kiln("models", "list", "--target", server.target, "--tls-ca", str(pki.ca), "--tls-cert",
                   str(pki.client_cert), "--tls-key", str(pki.client_key))
        assert out.returncode == 0 and out.stdout.startswith("tiny\t"), out.stderr
    finally:
        server.stop()


def test_gateway_beside_a_tls_server(pki: Pki, tiny_store: Path, tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--store", str(tiny_store), "--port",
                                 str(port), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                                 "--gateway-port", str(http), "--target-tls-ca", str(pki.ca)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{http}", proc, log)
        r = httpx.post(f"http://127.0.0.1:{http}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_tls_flags_are_checked(pki: Pki, tiny_store: Path) -> None:
    out = kiln("serve", "--store", str(tiny_store), "--port", "0", "--tls-cert", str(pki.server_cert), timeout=60)
    assert out.returncode != 0 and "--tls-key" in out.stderr
    out = kiln("gateway", "--target", "127.0.0.1:1", "--target-tls-cert", str(pki.client_cert), timeout=60)
    assert out.returncode != 0 and "target_tls_key" in out.stderr


def start_server_tls(store: Path, tmp_path: Path, pki: Pki, *flags: str) -> ServerProcess:
    """`start_server` waits for health over plaintext; a TLS server is waited for by its log line."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--store", str(store), "--port", str(port),
                                 *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(proc, f"127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while "serving 1 model" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"TLS server did not start:\n{log_path.read_text()}")
        time.sleep(0.1)
    return server



def test_redis_ledger_over_tls(pki: Pki, tiny_store: Path, tmp_path: Path) -> None:
    """`--auth-db rediss://...?ssl_ca_certs=CA`: keys, credits and a charge through a Redis that speaks only TLS."""
    import shutil

    from bench.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        if os.environ.get("KILN_REQUIRE_REDIS"):
            pytest.fail("redis-server is missing and KILN_REQUIRE_REDIS is set")
        pytest.skip("redis-server is not installed here: the Redis-over-TLS ledger went untested")
    with RedisServer(tmp_path, tls=(pki.server_cert, pki.server_key, pki.ca)) as redis:
        assert redis.url.startswith("rediss://")
        out = kiln("keys", "create", "--auth-db", redis.url, "--tier", "free")
        assert out.returncode == 0, out.stderr
        key = out.stdout.strip().splitlines()[-1]
        plain = redis.url.replace("rediss://", "redis://").split("?")[0]
        assert kiln("keys", "list", "--auth-db", plain, timeout=60).returncode != 0  # no plaintext port
        server = start_server(tiny_store, tmp_path / "serve.log", "--auth-db", redis.url)
        try:
            out = kiln("generate", "--target", server.target, "--api-key", key, "--model", "tiny", "--prompt", "x",
                       "--steps", "2", "--quiet", "--out", str(tmp_path / "x.png"))
            assert out.returncode == 0 and "cost 1 credit(s)" in out.stderr, out.stderr
        finally:
            server.stop()
