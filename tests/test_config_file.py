"""`kiln serve --config`: the shipped example names every flag and parses; a file's values become the flags'
defaults (the command line wins); unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx

from cli.config_file import _actions, apply
from cli.main import parser
from tests.conftest import ROOT, free_port, kiln, start_server

EXAMPLE = ROOT / "deploy" / "kiln.toml"


def test_the_example_names_every_serve_flag_and_parses(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^#? ?([a-z][a-z0-9-]*) = ", text, re.M))
    flags = set(_actions(parser().config_commands["serve"]))
    assert keys == flags, f"missing from the example: {flags - keys}; not flags: {keys - flags}"
    # every key, commented out or not, holds a value `kiln serve` takes
    everything = tmp_path / "all-keys.toml"
    everything.write_text("\n".join(line.removeprefix("# ") if re.match(r"^# [a-z][a-z0-9-]* = ", line) else line
                                    for line in text.splitlines()))
    p = parser()
    apply(p.config_commands["serve"], str(everything))
    args = p.parse_args(["serve"])  # --store comes from the file
    assert args.store == tomllib.loads(text)["store"] and args.metrics_port == 9090 and args.log_format == "json"
    assert args.cors_allow_origins == ("https://app.example",) and args.api_auth["alice:secret"] == "kiln_..."
    assert args.no_batching is False and args.tls_client_ca == "/etc/kiln/clients-ca.pem"


def test_serve_reads_its_flags_from_the_file_and_the_command_line_wins(tiny_store: Path, tmp_path: Path) -> None:
    metrics = free_port()
    config = tmp_path / "kiln.toml"
    config.write_text(f'store = "{tiny_store}"\nport = 1\nlog-format = "json"\nmetrics-port = {metrics}\n'
                      "max-batch = 4\n")
    server = start_server(tiny_store, tmp_path / "serve.log", "--config", str(config))  # its --port beats port = 1
    try:
        assert server.log().lstrip().startswith("{")  # log-format from the file
        assert "kiln_requests_total" in httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    finally:
        server.stop()


def test_bad_files_are_errors_naming_the_key(tmp_path: Path) -> None:
    for body, words in (('stor = "x"', "unknown key 'stor'"), ('port = "many"', "port = 'many': expected an integer"),
                        ("no-batching = 1", "expected true or false"), ('engine = "tpu"', "expected one of"),
                        ("port = [", "not TOML")):
        config = tmp_path / "bad.toml"
        config.write_text(body + "\n")
        out = kiln("serve", "--config", str(config), "--store", "x", timeout=60)
        assert out.returncode == 2 and any(w in out.stderr for w in [words]), (body, out.stderr)
