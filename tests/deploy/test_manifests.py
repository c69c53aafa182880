"""deploy/: checks that cannot drift. Every YAML file parses; every `kiln serve` command line in Compose and
Kubernetes parses with the real CLI (its --config file included) and spells only real flags; the ports, the
ledger, the store and the metrics port each manifest names agree with what that command line serves; the
Kubernetes probes are gRPC health checks on the served port; the termination grace periods cover ServeConfig's
default --shutdown-grace; HAProxy's config passes `haproxy -c`."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from grpc_health.v1 import health_pb2

from cli.config_file import _actions, apply, config_path
from cli.main import parser
from runtime.server.app import SERVICE_NAME, ServeConfig
from runtime.server.metrics import Metrics
from tests.conftest import ROOT
from tests.deploy.conftest import haproxy_binary
from tests.deploy.haproxy_config import HAPROXY_CFG, bind_port, sections

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DEFAULT_GRACE = ServeConfig.__dataclass_fields__["shutdown_grace_s"].default
"""The grace the manifests must give: ServeConfig's default (what `kiln serve` runs with unless told)."""
MARGIN_S = (5, 60)
"""Seconds a container's termination grace may exceed the server's own: room to cancel what is left and release
its credits, not so much that a stuck pod lingers."""


def load(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def serve_args(argv: list[str], files: dict[str, str], tmp_path: Path) -> argparse.Namespace:
    """`argv` (`serve ...`) as `kiln` reads it (cli.main.main): the --config file applied first, from `files`
    (container path -> its text), then the real parser. Every `--flag` must be spelled out in full: argparse would
    take an unambiguous prefix, which a later flag could make ambiguous."""
    assert argv[0] == "serve", argv
    p = parser()
    sub = p.config_commands["serve"]  # type: ignore[attr-defined]
    flags = set(_actions(sub)) | {"config"}
    for token in argv:
        if token.startswith("--"):
            assert token[2:].split("=", 1)[0] in flags, f"`kiln serve` has no flag {token} (in {argv})"
    argv = list(argv)
    if (path := config_path(argv)) is not None:
        assert path in files, f"--config {path}: no volume mounts such a file"
        local = tmp_path / Path(path).name
        local.write_text(files[path])
        argv[argv.index(path)] = str(local)
        apply(sub, str(local))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return p.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`kiln {' '.join(argv)}` does not parse: {err.getvalue()}")


def seconds(duration: str | int) -> float:
    """Compose durations: `315s`, `5m15s`, `1h`."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    h, m, s = parts.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0)


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {"compose.yaml", "prometheus.yml", "k8s/deployment.yaml"}
    for f in files:
        for doc in load(f):
            if f.parent == K8S:
                assert doc.get("apiVersion") and doc.get("kind"), f"{f}: a manifest without apiVersion/kind"
                assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], f
    listed = load(K8S / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def test_the_default_grace_is_the_cli_s() -> None:
    assert parser().config_commands["serve"].get_default("shutdown_grace") == DEFAULT_GRACE  # type: ignore[attr-defined]


# --- Compose -------------------------------------------------------------------------------------------------------
def _mount(volumes: list[str], target: str) -> tuple[str, bool]:
    """(source, read-only) of the short-syntax volume mounted at `target`."""
    for v in volumes:
        source, inside, *mode = v.split(":")
        if inside == target:
            return source, mode == ["ro"]
    raise AssertionError(f"nothing is mounted at {target}: {volumes}")


def test_compose(tmp_path: Path) -> None:
    compose = load(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    kiln = services["kiln"]
    toml_source, ro = _mount(kiln["volumes"], "/etc/kiln/kiln.toml")
    assert ro and (DEPLOY / toml_source).resolve() == DEPLOY / "kiln.toml"
    args = serve_args(kiln["command"], {"/etc/kiln/kiln.toml": (DEPLOY / "kiln.toml").read_text()}, tmp_path)
    assert kiln["build"] == {"context": "..", "dockerfile": "Dockerfile"} and (DEPLOY / ".." / "Dockerfile").exists()
    # the store: one named volume, read-only in every replica, where --store points
    store_volume, ro = _mount(kiln["volumes"], args.store)
    assert ro and store_volume in compose["volumes"]
    # the ledger: the Redis service, with AOF on
    ledger = urlparse(args.auth_db)
    assert ledger.scheme == "redis" and ledger.hostname in services
    assert " ".join(services[ledger.hostname]["command"]).count("--appendonly yes") == 1
    assert args.host == "0.0.0.0" and args.metrics_host == "0.0.0.0"
    # the grace: ServeConfig's default, and Compose waits a little longer before its SIGKILL
    assert args.shutdown_grace == DEFAULT_GRACE
    assert MARGIN_S[0] <= seconds(kiln["stop_grace_period"]) - args.shutdown_grace <= MARGIN_S[1]
    # HAProxy: the shipped config, balancing over the replicas' served port; it stops softly, no sooner than they
    haproxy = services["haproxy"]
    cfg_source, ro = _mount(haproxy["volumes"], "/usr/local/etc/haproxy/haproxy.cfg")
    assert ro and (DEPLOY / cfg_source).resolve() == HAPROXY_CFG
    assert haproxy["stop_signal"] == "SIGUSR1"
    assert seconds(haproxy["stop_grace_period"]) >= seconds(kiln["stop_grace_period"])
    template = next(line for line in sections()["backend kiln"] if line.startswith("server-template "))
    _, prefix, count, address, *_ = template.split()
    assert address == f"kiln:{args.port}", template
    assert 2 <= kiln["deploy"]["replicas"] <= int(count.split("-")[1])
    published = {p.split(":")[-1] for p in haproxy["ports"]}
    assert published == {str(bind_port("frontend grpc")), str(bind_port("frontend stats"))}
    # Prometheus: every replica's --metrics-port, and HAProxy's exporter
    prom_source, _ = _mount(services["prometheus"]["volumes"], "/etc/prometheus/prometheus.yml")
    jobs = {j["job_name"]: j for j in load(DEPLOY / prom_source)[0]["scrape_configs"]}
    assert jobs["kiln"]["dns_sd_configs"] == [{"names": ["kiln"], "type": "A", "port": args.metrics_port,
                                               "refresh_interval": "15s"}]
    assert jobs["haproxy"]["static_configs"] == [{"targets": [f"haproxy:{bind_port('frontend stats')}"]}]


# --- Kubernetes ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in load(f):
            if doc["kind"] != "Kustomization":
                out[doc["kind"], doc["metadata"]["name"]] = doc
    return out


def _kiln_args(k8s: dict, tmp_path: Path) -> tuple[dict, dict, argparse.Namespace]:  # type: ignore[type-arg]
    """The pod template, its kiln container, and that container's `kiln serve` flags (ConfigMap file included)."""
    pod = k8s["Deployment", "kiln"]["spec"]["template"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "kiln")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]]
        if "configMap" in source:
            for key, text in k8s["ConfigMap", source["configMap"]["name"]]["data"].items():
                files[f"{mount['mountPath']}/{key}"] = text
    return pod, container, serve_args(container["args"], files, tmp_path)


def test_kubernetes_probes_are_grpc_health_checks_on_the_served_port(k8s: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    _, container, args = _kiln_args(k8s, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == args.port and ports["metrics"] == args.metrics_port
    assert args.host == "0.0.0.0" and args.metrics_host == "0.0.0.0"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold", "initialDelaySeconds",
                             "successThreshold"} == {"grpc"}, f"{kind}: {probe}"
        assert probe["grpc"]["port"] == args.port, kind
        # the server sets both: "" (the whole server) and the Kiln service (runtime/server/app.py)
        assert probe["grpc"].get("service", "") in ("", SERVICE_NAME), kind


def test_kubernetes_grace_covers_the_server_s(k8s: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    pod, container, args = _kiln_args(k8s, tmp_path)
    assert args.shutdown_grace == DEFAULT_GRACE
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    margin = pod["spec"]["terminationGracePeriodSeconds"] - float(pre_stop[1]) - args.shutdown_grace
    assert MARGIN_S[0] <= margin <= MARGIN_S[1], margin


def test_kubernetes_objects_agree(k8s: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    pod, container, args = _kiln_args(k8s, tmp_path)
    deployment = k8s["Deployment", "kiln"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    # ONNX Runtime's threads = the CPU the pod asks for (0 would mean every core of the node)
    assert args.threads == int(container["resources"]["requests"]["cpu"]) > 0
    assert "memory" in container["resources"]["limits"]
    # the store: the read-only claim, mounted read-only where --store points
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    store = volumes[mounts[args.store]["name"]]
    assert mounts[args.store]["readOnly"] and store["persistentVolumeClaim"]["readOnly"]
    assert k8s["PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == \
        ["ReadOnlyMany"]
    # the read-only root leaves KILN_CACHE_DIR (/data/cache in the image) writable
    assert container["securityContext"]["readOnlyRootFilesystem"] and "/data" in mounts
    # Services: gRPC over HTTP/2 cleartext to the named port; metrics on the headless one
    for name in ("kiln", "kiln-headless"):
        service = k8s["Service", name]["spec"]
        assert service["selector"] == labels
        grpc_port = next(p for p in service["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    assert next(p for p in k8s["Service", "kiln-headless"]["spec"]["ports"] if p["name"] == "metrics")[
        "targetPort"] == "metrics"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    # the HPA scales this Deployment on CPU; the PDB guards the same pods
    hpa = k8s["HorizontalPodAutoscaler", "kiln"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kiln"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu" and 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert k8s["PodDisruptionBudget", "kiln"]["spec"]["selector"]["matchLabels"] == labels
    # the ledger: the Redis StatefulSet behind the Service --auth-db names, AOF on, on its claim
    ledger = urlparse(args.auth_db)
    assert ledger.scheme == "redis"
    redis_service = k8s["Service", ledger.hostname]
    redis = k8s["StatefulSet", redis_service["metadata"]["name"]]
    assert redis["spec"]["selector"]["matchLabels"] == redis_service["spec"]["selector"]
    assert next(p for p in redis_service["spec"]["ports"])["port"] == (ledger.port or 6379)
    redis_container = redis["spec"]["template"]["spec"]["containers"][0]
    redis_args = " ".join(redis_container["args"])
    assert "--appendonly yes" in redis_args
    data_dir = redis_args.split("--dir ")[1].split()[0]
    claim = next(m for m in redis_container["volumeMounts"] if m["mountPath"] == data_dir)["name"]
    assert claim in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}


def test_the_queue_depth_alternative_names_a_real_gauge() -> None:
    """hpa.yaml and deploy/README.md document scaling on `kiln_requests_queued`: the server's gauge of that name."""
    gauges = {m.name for m in Metrics().registry.collect() if m.type == "gauge"}
    assert "kiln_requests_queued" in gauges
    for doc in (K8S / "hpa.yaml", DEPLOY / "README.md"):
        assert "kiln_requests_queued" in doc.read_text(), doc


# --- HAProxy -------------------------------------------------------------------------------------------------------
def test_haproxy_accepts_its_config() -> None:
    out = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "Configuration file is valid" in out.stdout + out.stderr, out.stderr
    assert "WARNING" not in out.stdout + out.stderr, out.stderr  # a warning is a setting HAProxy ignores
    backend = sections()["backend kiln"]
    assert "balance leastconn" in backend and "option tcp-check" in backend
    default_server = next(line for line in backend if line.startswith("default-server ")).split()
    assert default_server[1:3] == ["proto", "h2"] and "check" in default_server


def test_haproxy_s_health_check_is_a_grpc_health_check() -> None:
    """The raw HTTP/2 bytes the check sends are one grpc.health.v1.Health/Check call, and the bytes it expects are
    the answer SERVING (the live test shows a NOT_SERVING replica kept down)."""
    backend = sections()["backend kiln"]
    sent = bytes.fromhex("".join(line.split()[2] for line in backend if line.startswith("tcp-check send-binary ")))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert sent.startswith(preface)
    frames, at = [], len(preface)
    while at < len(sent):
        length, kind, flags, stream = int.from_bytes(sent[at:at + 3], "big"), sent[at + 3], sent[at + 4], \
            int.from_bytes(sent[at + 5:at + 9], "big")
        frames.append((kind, flags, stream, sent[at + 9:at + 9 + length]))
        at += 9 + length
    assert at == len(sent) and [f[:3] for f in frames] == [(0x4, 0, 0), (0x1, 0x4, 1), (0x0, 0x1, 1)]
    method = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/Check".encode()
    headers = frames[1][3]  # HPACK, literal strings without Huffman coding: the text is there as is
    assert headers[:2] == b"\x83\x86"  # :method POST, :scheme http (HPACK's static table)
    assert bytes([len(method)]) + method in headers and b"\x10application/grpc" in headers
    message = frames[2][3]
    assert message[0] == 0 and int.from_bytes(message[1:5], "big") == len(message) - 5
    assert health_pb2.HealthCheckRequest.FromString(message[5:]) == health_pb2.HealthCheckRequest(service="")
    expected = bytes.fromhex(next(line for line in backend if line.startswith("tcp-check expect ")).split()[3])
    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    assert expected == b"\x00" + len(serving).to_bytes(4, "big") + serving
