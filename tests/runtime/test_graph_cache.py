"""ONNX Runtime's optimized graphs cached on disk (runtime/graph_cache.py): a second open reads the cached graph
with optimization off and computes exactly what a fresh optimization does; entries are keyed on the files, the
session entries and the CPU, and a damaged one is rebuilt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_store import BundleRef, Manifest
from runtime import graph_cache
from runtime.graph_cache import KEY_FILE, MODEL_FILE, GraphCache
from runtime.model import graph_key, load_bundle
from runtime.pipeline import Pipeline
from tests.conftest import start_server
from tests.runtime.test_pipeline import params


def _load(bundle: Path, cache: GraphCache | None):  # type: ignore[no-untyped-def]
    return load_bundle(BundleRef(bundle, Manifest.read(bundle)), graphs=cache)


def _image(model) -> np.ndarray:  # type: ignore[no-untyped-def]
    images, _ = Pipeline(model).run(params(model, seed=3, steps=3, guidance_scale=3.0))
    return images[0]


def test_a_second_open_reads_the_cached_graph_and_draws_the_same_image(tiny_bundle: Path, tmp_path: Path) -> None:
    cache = GraphCache(tmp_path / "graphs")
    plain = _image(_load(tiny_bundle, None))
    first = _load(tiny_bundle, cache)
    assert {s.graph_cache for s in first.sessions.values()} == {"written"}
    entries = sorted(p for p in cache.root.iterdir())
    assert len(entries) == len(first.sessions)  # one per component, none left half-written (.tmp-*)
    assert all((e / KEY_FILE).is_file() and (e / MODEL_FILE).is_file() for e in entries)
    second = _load(tiny_bundle, cache)
    assert {s.graph_cache for s in second.sessions.values()} == {"hit"}
    np.testing.assert_array_equal(_image(first), plain)
    np.testing.assert_array_equal(_image(second), plain)

    # what is cached is the optimizer's output, not a copy: fused ops (ONNX Runtime's com.microsoft domain) in
    # place of the exported ones, fewer nodes
    m = Manifest.read(tiny_bundle)
    unet = onnx.load(str(cache.entry(graph_key(m, m.components["unet"], None)) / MODEL_FILE), load_external_data=False)
    source = onnx.load(str(tiny_bundle / m.components["unet"].file), load_external_data=False)
    ops = Counter((n.domain, n.op_type) for n in unet.graph.node)
    assert any(domain == "com.microsoft" for domain, _ in ops), ops
    assert len(unet.graph.node) < len(source.graph.node)


def test_a_damaged_entry_is_rebuilt(tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = GraphCache(tmp_path / "graphs")
    plain = _image(_load(tiny_bundle, cache))
    m = Manifest.read(tiny_bundle)
    entry = cache.entry(graph_key(m, m.components["unet"], None))
    (entry / MODEL_FILE).write_bytes(b"not a graph")
    again = _load(tiny_bundle, cache)
    assert again.sessions["unet"].graph_cache == "written"
    assert again.sessions["text_encoder"].graph_cache == "hit"
    assert "cached optimized graph" in caplog.text and "failed to open" in caplog.text
    np.testing.assert_array_equal(_image(again), plain)
    assert onnx.load(str(entry / MODEL_FILE), load_external_data=False).graph.node  # a whole graph again


def test_the_key_follows_the_files_the_session_entries_and_the_cpu(tiny_bundle: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    m = Manifest.read(tiny_bundle)
    unet, vae = m.components["unet"], m.components["vae_decoder"]
    base = graph_key(m, unet, None).digest()
    assert base == graph_key(m, unet, None).digest()
    assert base != graph_key(m, vae, None).digest()
    assert base != graph_key(m, unet, {"session.x64quantprecision": "1"}).digest()
    monkeypatch.setattr(graph_cache, "_cpu_identity", lambda: "another CPU|avx2")
    assert base != graph_key(m, unet, None).digest()


def test_kiln_serve_keeps_graphs_in_its_cache_dir_unless_told_not_to(tiny_store: Path, tmp_path: Path) -> None:
    for run, extra in (("first", ()), ("restart", ()), ("off", ("--no-graph-cache",))):
        cache = tmp_path / ("cache-off" if extra else "cache")
        server = start_server(tiny_store, tmp_path / f"{run}.log", "--cache-dir", str(cache), *extra)
        try:
            log = server.log()
        finally:
            server.stop()
        if run == "off":
            assert not (cache / graph_cache.GRAPHS_DIR).exists()
            assert "optimized graphs from the cache" not in log
        else:
            state = "written" if run == "first" else "hit"
            assert f"optimized graphs from the cache: text_encoder {state}, unet {state}" in log, log


def test_a_cache_that_cannot_be_written_is_skipped(tiny_bundle: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")  # mkdir fails (as root too, unlike permissions)
    model = _load(tiny_bundle, GraphCache(blocked / "graphs"))
    assert {s.graph_cache for s in model.sessions.values()} == {"off"}
    assert "could not cache its optimized graph" in caplog.text
    np.testing.assert_array_equal(_image(model), _image(_load(tiny_bundle, None)))
