"""deploy/haproxy.cfg as the tests read it: its sections, and the file with only its addresses changed."""

from __future__ import annotations

import re

from tests.conftest import ROOT

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


def sections(text: str | None = None) -> dict[str, list[str]]:
    """`"backend kiln"` -> its lines (comments and blank lines dropped), `"global"`, `"defaults"`, ..."""
    out: dict[str, list[str]] = {}
    current = ""
    for raw in (HAPROXY_CFG.read_text() if text is None else text).splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            out[current] = []
        else:
            out[current].append(line.strip())
    return out


def bind_port(section: str) -> int:
    binds = [line for line in sections()[section] if line.startswith("bind ")]
    assert len(binds) == 1, binds
    return int(re.match(r"bind \S*:(\d+)", binds[0]).group(1))  # type: ignore[union-attr]


def for_test(grpc_port: int, stats_port: int, servers: list[str]) -> str:
    """The shipped file with its addresses only changed: the two frontends bind loopback ports, and the Compose
    `server-template` (replicas found through Docker's DNS) becomes one `server` line per address. Balancing, HTTP/2,
    health checks and timeouts stay the file's."""
    text = HAPROXY_CFG.read_text()
    parsed = sections(text)
    for section, port in (("frontend grpc", grpc_port), ("frontend stats", stats_port)):
        line = next(x for x in parsed[section] if x.startswith("bind "))
        rebound = line.replace(line.split()[1], f"127.0.0.1:{port}", 1)  # `bind :50051 proto h2` keeps `proto h2`
        text = _sub_once(rf"^(\s+){re.escape(line)}(\s*(#.*)?)$", lambda m, r=rebound: m.group(1) + r, text)
    servers_text = "\n".join(f"server kiln{i} {addr}" for i, addr in enumerate(servers, 1))
    return _sub_once(r"^(\s+)server-template .*$",
                     lambda m: "\n".join(m.group(1) + s for s in servers_text.splitlines()), text)


def _sub_once(pattern: str, replacement, text: str) -> str:  # type: ignore[no-untyped-def]
    text, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n == 1, f"deploy/haproxy.cfg no longer has one line matching {pattern!r}: update tests/deploy"
    return text
