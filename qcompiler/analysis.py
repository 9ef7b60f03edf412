"""Graph analyses on a ``networkx`` view of the fx graph.

The fx graph stays the only IR; ``networkx`` is a read-only view used for
reachability questions (which compute layers read the network input, which ones
produce its output) and for the DOT dump.

Example:
    >>> from torch import nn
    >>> from qcompiler.frontend import trace
    >>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(1, 4),))
    >>> first_layers(gm), last_layers(gm)
    (['_0'], ['_2'])
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from . import ir


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph whose vertices are node names, with an edge per data use."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _frontier(g: nx.DiGraph, sources: list[str], layers: set[str], forward: bool) -> list[str]:
    """Compute layers reachable from ``sources`` without crossing another layer."""
    found, seen, stack = set(), set(sources), list(sources)
    step = g.successors if forward else g.predecessors
    while stack:
        for nxt in step(stack.pop()):
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in layers:
                found.add(nxt)
            else:
                stack.append(nxt)
    return sorted(found, key=list(g.nodes).index)


def first_layers(gm: fx.GraphModule) -> list[str]:
    """Compute layers that read a network input directly (through no other layer)."""
    g = to_networkx(gm)
    layers = {n.name for n in ir.compute_layers(gm)}
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return _frontier(g, inputs, layers, forward=True)


def last_layers(gm: fx.GraphModule) -> list[str]:
    """Compute layers whose result reaches the output through no other layer."""
    g = to_networkx(gm)
    layers = {n.name for n in ir.compute_layers(gm)}
    outputs = [n.name for n in gm.graph.nodes if n.op == "output"]
    return _frontier(g, outputs, layers, forward=False)


def to_dot(gm: fx.GraphModule, label) -> str:
    """Graphviz DOT text of ``gm``; ``label(node)`` gives each vertex's label."""
    lines = [f'digraph "{gm.__class__.__name__}" {{', "  node [shape=box, fontname=monospace, fontsize=10];"]
    for node in gm.graph.nodes:
        style = ""
        if ir.LAYER in node.meta:
            style = ", style=filled, fillcolor=lightblue"
        elif ir.ACT in node.meta:
            style = ", style=filled, fillcolor=khaki"
        text = label(node).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\l")
        lines.append(f'  "{node.name}" [label="{text}\\l"{style}];')
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["to_networkx", "first_layers", "last_layers", "to_dot"]
