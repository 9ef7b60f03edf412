"""IR dumps: a numbered text listing and a DOT file after every pass.

Think ``-print-after-all``: ``NN_<pass>.txt`` lists every node with its shape and
its quantization records, one record per line, so ``diff 02_observe.txt
03_lsq.txt`` shows exactly what ``lsq`` did.
"""

from __future__ import annotations

from pathlib import Path

import torch.fx as fx

from . import ir
from .analysis import to_dot


def _arg(a: object) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    return repr(a)


def node_line(node: fx.Node) -> str:
    """``%name = op target(args) :: shape`` for one node."""
    meta = node.meta.get("tensor_meta")
    shape = f" :: {list(meta.shape)}" if meta is not None and hasattr(meta, "shape") else ""
    args = ", ".join([_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])
    if node.op == "placeholder":
        return f"%{node.name} = input{shape}"
    if node.op == "output":
        return f"return {args}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"%{node.name} = {node.op.replace('call_', '')} {target}({args}){shape}"


def format_graph(gm: fx.GraphModule, title: str) -> str:
    """The readable listing of ``gm`` with every node's records."""
    lines = [f"# {title}"]
    for node in gm.graph.nodes:
        lines.append(node_line(node))
        for key, rec in ir.records(node).items():
            lines.append(f"    {key:<9} {ir.format_record(rec)}")
    return "\n".join(lines) + "\n"


def _label(node: fx.Node) -> str:
    recs = [f"{k}: {ir.format_record(r)}" for k, r in ir.records(node).items()]
    return "\n".join([node_line(node), *recs])


def write_dump(gm: fx.GraphModule, out_dir: Path, index: int, name: str, title: str) -> Path:
    """Write ``NN_name.txt`` and ``NN_name.dot`` into ``out_dir``; returns the text path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{index:02d}_{name}"
    text = stem.with_suffix(".txt")
    text.write_text(format_graph(gm, title))
    stem.with_suffix(".dot").write_text(to_dot(gm, _label))
    return text
