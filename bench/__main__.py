"""`python -m bench SCENARIO [options]`: run one benchmark scenario and write its Markdown table."""

from __future__ import annotations

import argparse
import sys

from bench import (
    cold_load,
    compile_memory,
    decoders,
    dreambooth,
    gateway,
    integrity,
    latency,
    lora,
    memory,
    observe,
    precision,
    quality,
    quota,
    single_file,
    switch,
    throughput,
    tome,
    tracing,
)

SCENARIOS = {"latency": latency, "quality": quality, "precision": precision, "quota": quota, "throughput": throughput,
             "tome": tome, "memory": memory, "integrity": integrity, "compile-memory": compile_memory,
             "single-file": single_file, "decoders": decoders, "dreambooth": dreambooth, "lora": lora,
             "gateway": gateway, "tracing": tracing, "observe": observe, "cold-load": cold_load, "switch": switch}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench")
    sub = p.add_subparsers(dest="scenario", required=True)
    for name, module in SCENARIOS.items():
        module.add_args(sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else name))
    args = p.parse_args(argv)
    path = SCENARIOS[args.scenario].run(args)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
