"""Residual blocks, detected from the graph, for block-level sensitivity (issue #18).

A residual Add adds a branch's output to the tensor the branch started from (a skip connection: x + f(x)).
The Adds split the graph into blocks: each block is the nodes the Add depends on that no earlier residual Add
depends on, so a transformer layer gives two blocks (attention, then the feed-forward network, each with the
LayerNorm that feeds it or follows the previous one) and a ResNet one per residual unit. auto keeps a whole
block in float as one fallback step (worker/engine/auto.py), so that precision is not fragmented inside a
block, as NVIDIA ModelOpt ranks whole transformer blocks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx


@dataclass(frozen=True)
class Block:
    name: str  # the residual Add's node name
    nodes: tuple[str, ...]  # in graph order, the Add included


def residual_adds(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Add nodes of two activations, one computed from the other (a skip connection: x + f(x)), in graph order.
    A position embedding added to a tensor it does not depend on is no residual Add, nor is an attention mask
    added to the scores before a Softmax."""
    consts = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def depends_on(tensor: str, source: str) -> bool:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t == source:
                return True
            node = producer.get(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(i for i in node.input if i and i not in consts)
        return False

    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax" and n.input}
    out = []
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(x in consts or not x for x in n.input):
            continue
        if n.output[0] in softmax_inputs:
            continue  # attention scores plus a mask: a later layer's scores depend on the mask through the first
        a, b = n.input
        if depends_on(b, a) or depends_on(a, b):
            out.append(n)
    return out


def find_blocks(model: onnx.ModelProto) -> list[Block]:
    """The residual blocks of ``model`` (empty without at least two residual Adds)."""
    adds = residual_adds(model)
    if len(adds) < 2:
        return []
    producer = {o: n for n in model.graph.node for o in n.output}
    order = {n.name: k for k, n in enumerate(model.graph.node)}
    assigned: set[str] = set()
    blocks = []
    for add in adds:
        members: list[str] = []
        stack = [add]
        while stack:
            node = stack.pop()
            if node.name in assigned:
                continue
            assigned.add(node.name)
            members.append(node.name)
            stack.extend(producer[i] for i in node.input if i in producer)
        blocks.append(Block(add.name, tuple(sorted(members, key=lambda m: order.get(m, 0)))))
    return blocks


def rank_blocks(blocks: Iterable[Block], sensitivity: Mapping[str, float], quantizable: Collection[str],
                min_layers: int = 2) -> list[dict[str, Any]]:
    """Blocks with at least ``min_layers`` quantizable layers, one of them measured, most sensitive first. A
    block's layers are its quantizable nodes (a fallback step keeps all of them in float); its sensitivity is the
    sum of its measured layers' (each layer's output noise-to-signal ratio with only it in int8, which add up
    roughly while they are small)."""
    ranked = []
    for b in blocks:
        layers = [n for n in b.nodes if n in quantizable]
        measured = [sensitivity[n] for n in layers if n in sensitivity]
        if len(layers) >= min_layers and measured:
            ranked.append({"name": b.name, "layers": layers, "sensitivity": round(float(sum(measured)), 6)})
    return sorted(ranked, key=lambda r: (-r["sensitivity"], r["name"]))
