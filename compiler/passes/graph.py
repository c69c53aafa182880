"""Shared graph lookups for the passes (not a pass itself)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx


def producers_and_consumers(
    nodes: Iterable[onnx.NodeProto],
) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """(tensor -> the node that writes it, tensor -> the nodes that read it, in graph order)."""
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for o in node.output:
            producer[o] = node
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    return producer, consumers
