"""The Docker image, without a Docker daemon: its ENTRYPOINT + CMD start a server that serves, safely by default, from
only the folders the image copies in; its HEALTHCHECK passes; the keys command the Dockerfile documents works.

The image's file set is rebuilt here: the folders its build stage COPYs, on a Python path that holds nothing else
of Kiln's (the interpreter starts with -S so the editable install's finder, which would find compiler/, is not
loaded). The container's volumes are temporary folders, and the port is a free one; every other argument is the
Dockerfile's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import grpc
import pytest

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.client import generate, wait_ready
from tests.conftest import ROOT, free_port

SERVING = {"cli", "model_store", "runtime", "proto", "gateway"}
"""The top-level packages serving needs (README: the runtime imports no compiler, quantize, torch or onnx), and
the HTTP gateway (`kiln gateway`, `kiln serve --gateway-port`)."""


def dockerfile() -> dict:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    json_list = {k: json.loads(m.group(1)) for k in ("ENTRYPOINT", "CMD", "VOLUME")
                 if (m := re.search(rf"^{k} (\[.*\])\s*$", final, re.M))}
    env = {}
    for line in re.findall(r"^ENV (.*)$", final, re.M):
        env.update(dict(item.split("=", 1) for item in line.split()))
    copied = re.findall(r"^COPY (?!--from)(\S+) \./\S+\s*$", text[: text.rindex("\nFROM ")], re.M)
    health = re.search(r"HEALTHCHECK .*?CMD (\[.*\])", final)
    assert health, "the Dockerfile has no HEALTHCHECK CMD"
    return {**json_list, "ENV": env, "COPY": copied, "HEALTHCHECK": json.loads(health.group(1))}


def test_the_image_copies_only_what_serving_needs() -> None:
    d = dockerfile()
    assert set(d["COPY"]) == SERVING, d["COPY"]
    assert d["ENTRYPOINT"] == ["kiln"] and d["CMD"][0] == "serve"
    assert set(d["VOLUME"]) == {"/store", "/data"}


class Image:
    """The image's files and volumes in temporary folders; `run(argv)` runs its `kiln` with them."""

    def __init__(self, root: Path, store: Path):
        self.src = root / "src"
        for name in SERVING:
            shutil.copytree(ROOT / name, self.src / name, ignore=shutil.ignore_patterns("__pycache__"))
        self.volumes = {"/store": store, "/data": root / "data"}
        (root / "data").mkdir()
        self.port = free_port()
        self.env = {k: self.mapped(v) for k, v in dockerfile()["ENV"].items() if k != "PATH"}

    def mapped(self, arg: str) -> str:
        """A container path as this test's folders hold it (the port too)."""
        for inside, outside in self.volumes.items():  # a path that starts the argument or follows sqlite:///
            arg = re.sub(rf"(^|sqlite:///){re.escape(inside)}(?=/|$)", rf"\g<1>{outside}", arg)
        return arg.replace("50051", str(self.port))

    def argv(self, args: list[str]) -> list[str]:
        site = sysconfig.get_paths()["purelib"]
        boot = (f"import sys; sys.path[:0] = [{str(self.src)!r}]; sys.path.append({site!r}); "
                "from importlib.util import find_spec\n"
                "assert find_spec('compiler') is None and find_spec('quantize') is None, 'compiler is importable'\n"
                "from cli.main import main; sys.exit(main(sys.argv[1:]))")
        return [sys.executable, "-S", "-c", boot, *[self.mapped(a) for a in args]]

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, cwd=self.src)


@pytest.fixture
def image(tiny_store: Path, tmp_path: Path) -> Image:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    return Image(tmp_path, store)


def test_the_image_command_serves_with_api_keys_by_default(image: Image, tmp_path: Path) -> None:
    d = dockerfile()
    command = d["ENTRYPOINT"][1:] + d["CMD"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(image.argv(command), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **image.env}, cwd=image.src)
    target = f"127.0.0.1:{image.port}"
    try:
        wait_ready(target, timeout=60)
        health = image.run(d["HEALTHCHECK"][1:])  # HEALTHCHECK CMD ["kiln", "wait", ...]
        assert health.returncode == 0, health.stderr
        request = pb.GenerateRequest(model="tiny", prompt="a red circle", steps=2, seed=1)
        with pytest.raises(grpc.RpcError) as refused:
            generate(target, request, tmp_path / "anon.png", progress=False)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the key command the Dockerfile documents, against the same /data volume
        keys = image.run(["keys", "create", "--auth-db", "sqlite:////data/auth.db", "--tier", "free"])
        assert keys.returncode == 0, keys.stderr
        token = keys.stdout.strip().splitlines()[-1]
        result = generate(target, request, tmp_path / "out.png", progress=False,
                          metadata=(("authorization", f"Bearer {token}"),))
        assert result.paths and result.paths[0].stat().st_size > 0
        assert (image.volumes["/data"] / "cache" / "verified-sha256.json").is_file()  # hashes kept on the volume
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    assert f"accounts: SqliteLedger('{image.volumes['/data'] / 'auth.db'}')" in log.read_text()


def test_compiling_in_the_image_says_the_compiler_is_not_installed(image: Image, tmp_path: Path) -> None:
    r = image.run(["compile", str(tmp_path), "--name", "x", "--store", "/store"])
    assert r.returncode == 2
    assert "`kiln compile` needs the compiler" in r.stderr and "pip install 'kiln[compiler]'" in r.stderr
