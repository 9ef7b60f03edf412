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

import operator
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ir
from .functional_layers import FORMS
from .nn import exact, saved
from .training_calls import TrainingOnlyCall, is_eval_identity


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
    """Compute layers on the main path next to the network input: every path from an input to them is layer-free.

    A layer that a skip connection also feeds with the raw input (a residual MLP's
    third layer, every block of a pre-norm transformer) reads the output of earlier
    layers too, so it is not a first layer. If no layer qualifies (each one also reads
    another layer's output), the layers the input reaches first are taken.
    """
    g = to_networkx(gm)
    layers = {n.name for n in ir.compute_layers(gm)}
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    frontier = _frontier(g, inputs, layers, forward=True)
    return [n for n in frontier if not (nx.ancestors(g, n) & layers)] or frontier


def last_layers(gm: fx.GraphModule) -> list[str]:
    """Compute layers on the main path next to the output: every path from them to the output is layer-free.

    The mirror of :func:`first_layers`: a layer whose result also flows through a
    skip connection past later layers to the output is not a last layer.
    """
    g = to_networkx(gm)
    layers = {n.name for n in ir.compute_layers(gm)}
    outputs = [n.name for n in gm.graph.nodes if n.op == "output"]
    frontier = _frontier(g, outputs, layers, forward=False)
    return [n for n in frontier if not (nx.descendants(g, n) & layers)] or frontier


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




# ---------------------------------------------------------------------------
# Numeric domains: what each tensor of a compiled graph is, in an integer deployment.
# ---------------------------------------------------------------------------

INPUT, CONST, GRID, ACC, FLOAT = "input", "const", "grid", "acc", "float"


@dataclass(frozen=True)
class Domain:
    """What a node's output is in an integer deployment.

    * ``input``: the network input or float preprocessing of it, before any quantizer;
    * ``const``: parameters, shapes and other values that are not activations;
    * ``grid``: integer codes times one step, those of the quantizer node ``grid``
      (a quantizer's output, or one carried through ops that keep codes intact:
      ReLU, max pooling, reshapes);
    * ``acc``: an exact affine function of integer codes (a quantized layer's
      accumulator, batch norm, average pooling, a join's sum) that the next
      quantizer requantizes; its hardware form is a wide integer plus a scale;
    * ``float``: computed in float; allowed only where a ``qc.float`` record says why.
    """

    kind: str
    grid: str | None = None


# Layers of every spatial rank that both backends and op_kind treat alike (1-D, 2-D, 3-D).
BATCH_NORMS = saved.BATCH_NORMS
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
ADAPTIVE_AVG_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)

_MAX_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
_AVG_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}


def _pool_call(node, defaults: dict) -> dict:
    kw = dict(zip(("kernel_size", *defaults), node.args[1:])) | dict(node.kwargs)
    return defaults | kw


def max_pool_call(node) -> dict:
    """``F.max_pool1d/2d/3d``'s arguments of a call node, defaults filled in."""
    return _pool_call(node, _MAX_POOL_DEFAULTS)


def avg_pool_call(node) -> dict:
    """``F.avg_pool1d/2d/3d``'s arguments of a call node, defaults filled in."""
    return _pool_call(node, _AVG_POOL_DEFAULTS)


# Dropout and drop-path modules: the identity in eval, the only mode a backend computes.
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
            TrainingOnlyCall)
# Ops whose output holds the same codes as their input (max commutes with a monotone quantizer).
_GRID_KEEPING_MODULES = (
    nn.ReLU, *MAX_POOLS, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Identity, *DROPOUTS, nn.Flatten, nn.Unflatten,
)
_GRID_KEEPING_FUNCTIONS = {
    torch.flatten, torch.relu, F.relu, *MAX_POOL_FUNCTIONS, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.permute, torch.transpose, operator.getitem, torch.chunk, torch.split, torch.unbind,
}
_GRID_KEEPING_METHODS = {
    "view", "reshape", "flatten", "relu", "contiguous", "permute", "transpose", "squeeze",
    "unsqueeze", "clone", "detach", "expand", "expand_as", "view_as", "chunk", "split", "unbind", "unflatten",
}
# Per-channel affine maps and linear reductions: foldable into the next requantization.
_AFFINE_MODULES = (
    *BATCH_NORMS, *AVG_POOLS, *ADAPTIVE_AVG_POOLS, nn.ReLU6, nn.Hardtanh,
)
_AFFINE_FUNCTIONS = {
    *AVG_POOL_FUNCTIONS, *ADAPTIVE_AVG_POOL_FUNCTIONS, F.relu6,
    F.hardtanh, torch.mean, exact.mean, torch.sum, F.batch_norm,
}
_AFFINE_METHODS = {"mean", "sum"}
_SCALAR_ARITHMETIC = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add, torch.sub}
# Shapes, not activations.
_CONST_METHODS = {"size", "dim", "numel"}
_CONST_ATTRIBUTES = {"shape", "device", "dtype", "ndim"}

JOIN_KINDS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub",
    torch.cat: "cat", torch.concat: "cat",
}


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def join_operands(node: fx.Node) -> list[fx.Node] | None:
    """The tensor operands of a residual add/sub or a concat, or ``None`` for any other node.

    An add of a tensor and a number or a parameter is an affine op, not a join.
    """
    key = node.target if node.op in ("call_function", "call_method") else None
    if node.op == "call_method" and key not in ("add", "sub"):
        return None
    if key not in JOIN_KINDS:
        return None
    if JOIN_KINDS[key] == "cat":
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        operands = [a for a in seq if isinstance(a, fx.Node)]
    else:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr" and _is_tensor(a)]
    return operands if len(operands) >= 2 else None


def is_constant_join(node: fx.Node, domains: dict[fx.Node, Domain]) -> bool:
    """An add/sub/concat with an operand computed from shapes and constants alone (transformers'
    attention mask, ``(1 - ones(size)) * min``): not a join of two activations, so not put on grids."""
    return any(domains[a].kind == CONST for a in join_operands(node) or ())


def join_kind(node: fx.Node) -> str:
    return JOIN_KINDS[node.target]


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is None or hasattr(meta, "shape")


_STATIC_TYPES = (int, float, bool, torch.Size, torch.device, torch.dtype)
_PIECES = {torch.chunk: "chunk", torch.split: "split", torch.functional.split: "split", torch.unbind: "unbind",
           "chunk": "chunk", "split": "split", "unbind": "unbind"}


def splits_into_pieces(node: fx.Node) -> bool:
    """Whether ``node`` is a ``chunk`` / ``split`` / ``unbind`` call: a tuple the graph reads piece by piece."""
    return node.op in ("call_function", "call_method") and _PIECES.get(node.target) is not None


def piece_index(node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """For ``getitem(pieces, i)`` of a :func:`splits_into_pieces` node: its source tensor and the index
    ``x[:, ...]`` that selects piece ``i`` (a slice along the split axis; an integer for ``unbind``);
    None for any other node, and where the sizes are computed at run time.

    >>> import torch.fx as fx
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.chunk(3, dim=1)[2]
    >>> gm = fx.symbolic_trace(M())
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> _ = ShapeProp(gm).propagate(torch.zeros(2, 7, 4))
    >>> getitem = [n for n in gm.graph.nodes if n.name == "getitem"][0]
    >>> piece_index(getitem)[1]
    (slice(None, None, None), slice(6, 7, None))
    """
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node) or not splits_into_pieces(node.args[0]):
        return None
    pieces, i = node.args[0], node.args[1]
    src = pieces.args[0]
    meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    if not hasattr(meta, "shape") or not isinstance(i, int):
        return None
    kind = _PIECES[pieces.target]
    second = pieces.args[1] if len(pieces.args) > 1 else None
    if kind == "unbind":
        dim = pieces.kwargs.get("dim", second if second is not None else 0)
    else:
        dim = pieces.kwargs.get("dim", pieces.args[2] if len(pieces.args) > 2 else 0)
    sizes = pieces.kwargs.get("chunks", pieces.kwargs.get("split_size_or_sections", pieces.kwargs.get("split_size", second)))
    if any(isinstance(a, fx.Node) for a in (dim, sizes, *(sizes if isinstance(sizes, (list, tuple)) else ()))):
        return None  # sizes computed at run time
    dim %= len(meta.shape)
    if kind == "unbind":
        return src, (slice(None),) * dim + (i,)
    length = int(meta.shape[dim])
    if not isinstance(sizes, (list, tuple)):  # chunk: ceil(length / chunks) each; split: the given size each
        size = -(-length // int(sizes)) if kind == "chunk" else int(sizes)
        sizes = [min(size, length - a) for a in range(0, length, size)]
    start = sum(sizes[:i])
    return src, (slice(None),) * dim + (slice(start, start + sizes[i]),)


def static_index(node: fx.Node) -> tuple[fx.Node, tuple]:
    """The tensor a ``getitem`` node reads and its index ``x[:, ...]`` (slices and integers with
    constant bounds; the batch axis whole), for the backends' ``index`` / ``Slice``.

    A chunk's piece is an index of the chunked tensor (:func:`piece_index`); a slice's stop read
    from a shape (``x[:, :x.size(1) - 1]``) is the recorded length. Raises ``ValueError``
    naming what no backend expresses.
    """
    piece = piece_index(node)
    if piece is None and isinstance(node.args[0], fx.Node) and splits_into_pieces(node.args[0]):
        raise ValueError("a chunk, split or unbind with sizes computed at run time")
    src, idx = piece if piece is not None else (node.args[0], node.args[1])
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not idx or idx[0] != slice(None) or any(not isinstance(i, (slice, int)) for i in idx):
        raise ValueError("indexing other than x[:, slices or integers] (the batch axis whole)")
    out_shape = node.meta["tensor_meta"].shape[1:]
    resolved, out_axis = [idx[0]], 0  # out_axis: the recorded output axis (batch dropped) a slice makes
    for i in idx[1:]:
        if isinstance(i, slice):
            if isinstance(i.stop, fx.Node) and isinstance(i.start, (int, type(None))) and (i.start or 0) >= 0 \
                    and i.step in (None, 1):  # x[:, :seq_len] with seq_len read from a shape: the recorded length
                i = slice(i.start, (i.start or 0) + int(out_shape[out_axis]))
            if any(isinstance(b, fx.Node) for b in (i.start, i.stop, i.step)):
                raise ValueError("a slice whose start or step is computed at run time")
            out_axis += 1
        resolved.append(i)
    return src, tuple(resolved)


def single_output(output: fx.Node) -> fx.Node:
    """The one tensor a graph returns: the output node's value, or the only tensor in the dict,
    list or tuple it returns (torchvision's segmentation models return ``{"out": logits}``).
    Raises ``ValueError`` for several (the backends deploy one output)."""
    leaves: list[fx.Node] = []
    fx.node.map_arg(output.args[0], leaves.append)
    if len(leaves) != 1:
        raise ValueError(f"the model returns {len(leaves)} tensors; the backends deploy one "
                         "(return the one to deploy, e.g. drop an auxiliary head with aux_loss=False)")
    return leaves[0]


def class_axis(gm: fx.GraphModule) -> int:
    """The axis of the model's output that holds its classes, for "classes agree" between backends:
    1 where the last layer before the output is a convolution and the output keeps its spatial axes
    (a segmentation map ``(N, C, H, W)``), else the last axis (a classifier's ``(N, K)``, a
    transformer's ``(N, T, V)``).
    """
    out = single_output(next(n for n in gm.graph.nodes if n.op == "output"))
    node = out
    while node is not None and ir.LAYER not in node.meta:  # back through upsampling, activations, joins
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    layer = ir.find(node, ir.LAYER, ir.LayerInfo) if node is not None else None
    meta = out.meta.get("tensor_meta")
    spatial = hasattr(meta, "shape") and len(meta.shape) > 2
    return 1 if spatial and layer is not None and not layer.kind == "linear" else -1


def sole_tensor(value) -> torch.Tensor:
    """The module's output as the backends compute it: the tensor itself, or the only tensor in
    the dict, list or tuple the module returns (see :func:`single_output`).

    >>> sole_tensor({"out": torch.ones(1), "aux": None}).shape
    torch.Size([1])
    """
    def tensors(v) -> list[torch.Tensor]:
        if isinstance(v, torch.Tensor):
            return [v]
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
        return [t for item in items for t in tensors(item)]

    found = tensors(value)
    if len(found) != 1:
        raise ValueError(f"the model returns {len(found)} tensors; the backends deploy one")
    return found[0]


_NEAREST_MODES = ("nearest", "nearest-exact")
_INTERPOLATIONS = (F.interpolate, F.upsample, F.upsample_nearest)
_INTERPOLATE_ARGS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def upsampling_call(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    """``F.interpolate``'s arguments (but the input) of an upsampling node: a module
    (``nn.Upsample``, ``nn.UpsamplingNearest2d``) or a function call; ``None`` for other nodes."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.Upsample):  # UpsamplingNearest2d/Bilinear2d are subclasses
            return None
        return {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners,
                "recompute_scale_factor": m.recompute_scale_factor}
    if node.op != "call_function" or node.target not in _INTERPOLATIONS:
        return None
    call = dict(zip(_INTERPOLATE_ARGS, node.args[1:])) | dict(node.kwargs)
    if node.target is F.upsample_nearest:
        call["mode"] = "nearest"
    return call


def is_nearest_upsampling(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` upsamples by copying its nearest input position (modes ``nearest``, ``nearest-exact``):
    its output holds its input's codes."""
    call = upsampling_call(gm, node)
    return call is not None and call.get("mode", "nearest") in _NEAREST_MODES


def _computed(value) -> bool:
    return isinstance(value, fx.Node) or (isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value))


def _static_upsampling(gm: fx.GraphModule, node: fx.Node) -> tuple[dict, list[int], list[int]] | None:
    """An upsampling's arguments and its recorded spatial sizes in and out; a size read from another
    tensor's shape becomes the recorded output size. ``None`` where the scale factor or mode is
    computed in forward, or a shape was not recorded."""
    call, src = upsampling_call(gm, node), node.args[0]
    in_meta, out_meta = getattr(src, "meta", {}).get("tensor_meta"), node.meta.get("tensor_meta")
    if call is None or not hasattr(in_meta, "shape") or not hasattr(out_meta, "shape"):
        return None
    if _computed(call.get("scale_factor")) or _computed(call.get("mode")):
        return None
    in_size, out_size = [int(d) for d in in_meta.shape[2:]], [int(d) for d in out_meta.shape[2:]]
    return (dict(call, size=out_size) if _computed(call.get("size")) else call), in_size, out_size


def nearest_positions(gm: fx.GraphModule, node: fx.Node) -> list[list[int]] | None:
    """For a nearest-neighbour upsampling (``nn.Upsample``, ``F.interpolate`` in mode ``nearest``
    or ``nearest-exact``): per spatial axis, the input position each output position copies.

    Such an upsampling keeps its input's codes, and both backends express it as a gather
    along each spatial axis. The positions come from running the very call on coordinate
    tensors (torch's own rounding for every scale, integer or not); a size read from another
    tensor's shape (``F.interpolate(x, size=skip.shape[2:])``) is the recorded output size.
    ``None`` for other nodes and other modes (bilinear interpolation computes new values).
    """
    static = _static_upsampling(gm, node) if is_nearest_upsampling(gm, node) else None
    if static is None:
        return None
    call, in_size, out_size = static
    positions = []
    for axis in range(len(in_size)):
        coords = torch.arange(in_size[axis], dtype=torch.float64).view([-1 if a == axis else 1 for a in range(len(in_size))])
        coords = coords.expand(in_size).reshape(1, 1, *in_size).contiguous()
        picked = F.interpolate(coords, **{k: v for k, v in call.items() if v is not None})
        if list(picked.shape[2:]) != out_size:
            return None
        positions.append([int(p) for p in picked[(0, 0, *[slice(None) if a == axis else 0 for a in range(len(in_size))])]])
    return positions


_LINEAR_MODES = ("linear", "bilinear", "trilinear")


def is_linear_upsampling(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` upsamples by linear interpolation (modes ``linear``, ``bilinear``, ``trilinear``,
    no antialias): each output a weighted sum of its input neighbours, an affine map of the codes."""
    call = upsampling_call(gm, node)
    return call is not None and call.get("mode") in _LINEAR_MODES and not call.get("antialias")


def linear_weights(gm: fx.GraphModule, node: fx.Node) -> list[tuple[list[int], list[int], np.ndarray, np.ndarray]] | None:
    """For a linear upsampling: per spatial axis, the two input positions each output position reads
    and their weights, ``(low, high, low_weight, high_weight)`` (the weights of one position sum to 1).

    Torch's own weights (its source-index rule with or without ``align_corners``, the call's scale
    factor): the 1-D ``linear`` interpolation of an identity matrix along each axis, in float64,
    since the separable interpolation weighs a corner by the product of its axes' weights. A size
    read from another tensor's shape is the recorded output size; ``None`` for other nodes or a
    scale factor computed at run time.
    """
    static = _static_upsampling(gm, node) if is_linear_upsampling(gm, node) else None
    if static is None:
        return None
    call, in_size, out_size = static
    factor = call.get("scale_factor")
    factors = factor if isinstance(factor, (list, tuple)) else [factor] * len(in_size)
    axes = []
    for axis, (n_in, n_out) in enumerate(zip(in_size, out_size)):
        eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in)  # channel c: the one-hot input at c
        how = {"size": n_out} if factor is None else {
            "scale_factor": float(factors[axis]), "recompute_scale_factor": call.get("recompute_scale_factor")}
        m = F.interpolate(eye, mode="linear", align_corners=call.get("align_corners"), **how)[0].numpy()
        if m.shape[1] != n_out:
            return None
        low = m.argmax(0) if n_in == 1 else np.array([int(np.flatnonzero(col)[0]) if col.any() else 0 for col in m.T])
        high = np.minimum(low + 1, n_in - 1)
        low_weight = m[low, np.arange(n_out)]
        high_weight = np.where(high != low, m[high, np.arange(n_out)], 0.0)
        axes.append((low.tolist(), high.tolist(), low_weight, high_weight))
    return axes


class _Shape(tuple):
    """A recorded shape (batch axis first), as :func:`static_value` reads it: the batch size is not static."""


_SHAPE_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg)


def static_value(value):
    """A Python value the model computes from tensor shapes and constants (``x2.size()[2] - x1.size()[2]``,
    ``diff // 2``), evaluated on the shapes shape propagation recorded. Lists and tuples are evaluated
    element by element; anything else that is not a node is returned as it is.

    Raises ``ValueError`` for a value read from a tensor's contents or from the batch size (the
    backends serve any batch), naming the node.
    """
    if isinstance(value, (list, tuple)) and not isinstance(value, _Shape):
        return type(value)(static_value(v) for v in value)
    if not isinstance(value, fx.Node):
        return value
    n, target = value, value.target
    if (n.op == "call_method" and target == "size") or (n.op == "call_function" and target is getattr
                                                        and n.args[1:2] == ("shape",)):
        meta = getattr(n.args[0], "meta", {}).get("tensor_meta")
        if not hasattr(meta, "shape"):
            raise ValueError(f"{n.name} reads the shape of a tensor whose shape was not recorded")
        shape = _Shape(int(d) for d in meta.shape)
        if target == "size" and (len(n.args) > 1 or "dim" in n.kwargs):
            dim = static_value(n.args[1] if len(n.args) > 1 else n.kwargs["dim"])
            if dim % len(shape) == 0:
                _batch_read(n)
            return shape[dim]
        return shape
    if n.op == "call_function" and target is operator.getitem:
        seq, key = static_value(n.args[0]), static_value(n.args[1])
        if isinstance(seq, _Shape) and (key.start or 0 if isinstance(key, slice) else key) % len(seq) == 0:
            _batch_read(n)
        return seq[key]
    if n.op == "call_function" and target in _SHAPE_ARITHMETIC:
        return target(*static_value(n.args))
    raise ValueError(f"{n.name} is computed at run time, not from shapes and constants")


def _batch_read(n: fx.Node):
    raise ValueError(f"{n.name} reads the batch size, which the deployed model does not fix")


_PAD_MODES = {  # F.pad's mode of each padding module class (ZeroPad*d are ConstantPad*d)
    **dict.fromkeys((nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), "constant"),
    **dict.fromkeys((nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d), "reflect"),
    **dict.fromkeys((nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d), "replicate"),
    **dict.fromkeys((nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), "circular"),
}
_PAD_FUNCTIONS = (F.pad, torch.constant_pad_nd)


def padding_call(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    """``F.pad``'s arguments but the input (``pad``, ``mode``, ``value``) of a padding node, a call or a
    module (``nn.ZeroPad2d``, ``nn.ReflectionPad2d``, ...); ``None`` for other nodes."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        mode = next((mode for cls, mode in _PAD_MODES.items() if isinstance(m, cls)), None)
        return None if mode is None else {"pad": list(m.padding), "mode": mode, "value": getattr(m, "value", None)}
    if node.op != "call_function" or node.target not in _PAD_FUNCTIONS:
        return None
    names = ("pad", "mode", "value") if node.target is F.pad else ("pad", "value")
    return {"mode": "constant", "value": None} | dict(zip(names, node.args[1:])) | dict(node.kwargs)


def _copies(call: dict) -> bool:
    return not (call.get("mode") == "constant" and call.get("value") not in (None, 0, 0.0))


def is_copying_padding(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` pads by copying its input (zero padding, reflect, replicate, circular): its
    output holds its input's codes, zero being a code of every grid."""
    call = padding_call(gm, node)
    return call is not None and _copies(call)


def padding_positions(gm: fx.GraphModule, node: fx.Node) -> list[list[int] | None] | None:
    """For a padding that copies its input's values (zero padding, reflect, replicate, circular): per
    non-batch axis, the input position each output position holds, ``-1`` where it holds zero
    (``None`` for an axis left as it is). Pad amounts computed from shapes (a UNet's
    ``F.pad(x1, [diffX // 2, diffX - diffX // 2, ...])``) are evaluated on the recorded shapes, and
    the positions come from running torch's own padding on coordinates, one axis at a time
    (padding is separable), so every mode and negative amount (a crop) is torch's.

    ``None`` for other nodes. Raises ``ValueError`` for constant padding with a value other than
    zero (the only constant every code grid holds), amounts no backend can fix (read from tensor
    values or the batch size) or a padded batch axis.
    """
    call = padding_call(gm, node)
    if call is None:
        return None
    if not _copies(call):
        raise ValueError("constant padding with a value other than zero (zero is the only value on every grid)")
    if isinstance(call["mode"], fx.Node):
        raise ValueError("a padding mode chosen at run time")
    pad = [int(v) for v in static_value(call["pad"])]
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta") if node.args else None
    if not hasattr(meta, "shape"):
        raise ValueError("a padding whose input shape was not recorded")
    shape, axes = [int(d) for d in meta.shape], len(pad) // 2
    if len(pad) % 2 or axes >= len(shape):
        raise ValueError("a padding of the batch axis" if len(pad) % 2 == 0 else "an odd number of pad amounts")
    positions: list[list[int] | None] = [None] * (len(shape) - 1)
    for i in range(axes):
        axis = len(shape) - 1 - i
        if pad[2 * i] == pad[2 * i + 1] == 0:
            continue
        one_axis = [0] * len(pad)
        one_axis[2 * i: 2 * i + 2] = pad[2 * i: 2 * i + 2]
        size = [1] * len(shape)
        size[axis] = shape[axis]
        coords = torch.arange(1, shape[axis] + 1, dtype=torch.float64).reshape(size)  # 0 marks a zero
        kw = {"value": 0.0} if call["mode"] == "constant" else {}
        padded = F.pad(coords, one_axis, mode=call["mode"], **kw).flatten()
        positions[axis - 1] = [int(p) - 1 for p in padded]
    return positions


def is_static_value(node: fx.Node) -> bool:
    """Whether ``node`` computes a Python value from shapes (``x.size(0)``, ``x.shape``, ``c // 2``),
    not a tensor, as shape propagation recorded it, or checks one (``torch._assert``).

    Such values are only ever a reshape's arguments (``x.view(x.size(0), -1)``, a channel
    shuffle) or a slice's bound (:func:`static_index`), and the backends take a reshape's
    target from its own recorded shape, so they skip these nodes.
    """
    return node.target is torch._assert or ("tensor_meta" not in node.meta and node.meta.get("type") in _STATIC_TYPES)


def emits_nothing(node: fx.Node) -> bool:
    """Whether a backend emits nothing for ``node``: a :func:`is_static_value`, or a chunk / split /
    unbind tuple whose pieces its ``getitem`` users read (:func:`static_index`). Raises
    ``ValueError`` for such a tuple read whole."""
    if is_static_value(node):
        return True
    if not splits_into_pieces(node):
        return False
    if any(user.target is not operator.getitem for user in node.users):
        raise ValueError("a chunk, split or unbind read other than piece by piece")
    return True


@dataclass(frozen=True)
class ShapeBuilt:
    """A tensor computed from shapes and constants alone (a mask of ones, position ids): its value
    for one sample when ``batched`` (the first axis follows the batch, every sample alike), else whole."""

    value: torch.Tensor
    batched: bool


def shape_built_tensors(gm: fx.GraphModule, domains: dict[fx.Node, Domain] | None = None) -> dict[fx.Node, ShapeBuilt]:
    """The tensors of :data:`CONST` domain that data-carrying nodes read, other than attributes
    (``x + self.pos_embedding`` reads an initializer as it is), each evaluated on all-zero inputs
    of the recorded shapes with batch 1 and batch 2.

    transformers builds an attention mask as ``torch.ones(input_ids.size())`` and position ids
    as ``torch.arange(seq_len)``: tensors no input value reaches, whose shapes follow the
    input's. A backend gives them as constants (expanded to the run-time batch when their first
    axis is the batch). Raises ``ValueError`` naming the node when a value depends on the batch
    size other than by repeating one sample's value. ``domains``: :func:`tensor_domains` of ``gm``,
    where the caller has them.
    """
    domains = tensor_domains(gm) if domains is None else domains
    consts = {n for n, d in domains.items() if d.kind == CONST}
    built = [n for n in gm.graph.nodes
             if n in consts and n.op not in ("get_attr", "placeholder", "output")
             and hasattr(n.meta.get("tensor_meta"), "shape") and any(u not in consts for u in n.users)]
    if not built:
        return {}
    needed, stack = set(), list(built)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    values = []
    for batch in (1, 2):
        interpreter = fx.Interpreter(gm)
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n not in needed:
                    continue
                if n.op == "placeholder":
                    meta = n.meta.get("tensor_meta")
                    if not hasattr(meta, "shape"):
                        raise ValueError(f"input {n.name} has no recorded shape to build {built[0].name} from")
                    interpreter.env[n] = torch.zeros((batch, *meta.shape[1:]), dtype=meta.dtype)
                    continue
                try:
                    interpreter.env[n] = interpreter.run_node(n)
                except Exception as e:  # the model's own code, run on zero inputs: any error is its
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise ValueError(f"{n.name} is built from the input's shape, but computing it from the shape "
                                     f"alone failed ({reason})") from None
        values.append({n: interpreter.env[n].detach() for n in built})
    out = {}
    for n in built:
        one, two = values[0][n], values[1][n]
        if one.shape == two.shape and torch.equal(one, two):
            out[n] = ShapeBuilt(one, batched=False)
        elif one.dim() and one.shape[0] == 1 and two.shape == (2, *one.shape[1:]) and torch.equal(two, one.expand_as(two)):
            out[n] = ShapeBuilt(one, batched=True)
        else:
            raise ValueError(f"{n.name} is built from the input's shape, but its values depend on the batch size")
    return out


def feeds_only_constants(gm: fx.GraphModule, domains: dict[fx.Node, Domain] | None = None) -> set[fx.Node]:
    """Nodes of :data:`CONST` domain read only by such nodes (``torch.ones``, the shape values, a
    buffer they slice): a backend that writes :func:`shape_built_tensors` as constants emits nothing for them."""
    domains = tensor_domains(gm) if domains is None else domains
    return {n for n, d in domains.items() if d.kind == CONST and n.users
            and all(domains[u].kind == CONST and u.op != "output" for u in n.users)}


def is_identity(m: nn.Module) -> bool:
    """A module whose output is its input: ``nn.Identity``, dropout, an empty ``nn.Sequential`` (an identity shortcut)."""
    return isinstance(m, (nn.Identity, *DROPOUTS)) or (isinstance(m, nn.Sequential) and len(m) == 0)


# The op kind of each function and method target (the tables above do not overlap).
_FUNCTION_KINDS = {
    **dict.fromkeys(_GRID_KEEPING_FUNCTIONS, "keep"),
    **dict.fromkeys(_AFFINE_FUNCTIONS, "affine"),
    **dict.fromkeys(_SCALAR_ARITHMETIC, "scalar"),
}
_METHOD_KINDS = {
    **dict.fromkeys(_CONST_METHODS, "const"),
    **dict.fromkeys(_GRID_KEEPING_METHODS, "keep"),
    **dict.fromkeys(_AFFINE_METHODS, "affine"),
    **dict.fromkeys(("mul", "div", "add", "sub"), "scalar"),
}


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """``"keep"`` (codes unchanged), ``"affine"``, ``"scalar"`` (arithmetic with a number), ``"const"`` or ``"other"``."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _GRID_KEEPING_MODULES) or is_identity(m) or is_nearest_upsampling(gm, node) \
                or is_copying_padding(gm, node):
            return "keep"
        return "affine" if isinstance(m, _AFFINE_MODULES) or is_linear_upsampling(gm, node) else "other"
    if node.op == "call_function":
        if node.target is getattr and node.args[1:2] and node.args[1] in _CONST_ATTRIBUTES:
            return "const"  # x.shape, x.device: traced by transformers' tracer as getattr calls
        if callable(node.target) and is_eval_identity(node.target):
            return "keep"  # a dropout or drop-path call left as a function (its arguments computed in forward)
        if node.target in _PAD_FUNCTIONS:
            return "keep" if is_copying_padding(gm, node) else "other"
        if node.target in _INTERPOLATIONS:
            return "keep" if is_nearest_upsampling(gm, node) else "affine" if is_linear_upsampling(gm, node) else "other"
        return _FUNCTION_KINDS.get(node.target, "other")
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, "other")
    return "other"


def describe_op(gm: fx.GraphModule, node: fx.Node) -> str:
    """``nn.Sigmoid`` / ``torch.sigmoid`` / ``.softmax()``: how a user would name the op."""
    if node.op == "call_module":
        return f"module {type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', str(node.target))}"


def tensor_domains(gm: fx.GraphModule) -> dict[fx.Node, Domain]:
    """The :class:`Domain` of every node's output, in one pass in graph order."""
    out: dict[fx.Node, Domain] = {}
    for node in gm.graph.nodes:
        out[node] = _domain(gm, node, out)
    return out


def _domain(gm: fx.GraphModule, node: fx.Node, known: dict[fx.Node, Domain]) -> Domain:
    if node.op == "placeholder":
        return Domain(INPUT)
    if node.op in ("get_attr", "output"):
        return Domain(CONST)
    if ir.ACT in node.meta:
        return Domain(GRID, node.name)
    ins = [known[a] for a in _tensor_args(node)]
    live = [d for d in ins if d.kind != CONST]
    if ir.LAYER in node.meta:
        quantized = (ir.WEIGHT in node.meta or ir.ADDER_Q in node.meta) and ir.FLOAT not in node.meta
        return Domain(ACC) if quantized else Domain(FLOAT)
    if ir.MATMUL in node.meta:  # an integer product of two code tensors
        return Domain(ACC) if all(known[a].kind == GRID for a in node.args) else Domain(FLOAT)
    if ir.LOOKUP in node.meta:  # a function of codes: a table of its values
        return Domain(ACC) if known[node.args[0]].kind == GRID else Domain(FLOAT)
    if not live or op_kind(gm, node) == "const":  # x.size() is a shape even when x is the input
        return Domain(CONST)
    if all(d.kind == INPUT for d in live):
        return Domain(INPUT)
    if any(d.kind == FLOAT for d in live):
        return Domain(FLOAT)
    operands = join_operands(node)
    if operands is not None and not is_constant_join(node, known):
        return Domain(ACC) if all(known[a].kind == GRID for a in operands) else Domain(FLOAT)
    if operands is not None and len(live) == 1 and live[0].kind in (GRID, ACC):
        return Domain(ACC)  # an activation plus a constant tensor (an attention mask): a foldable offset
    kind = op_kind(gm, node)
    if kind == "const":
        return Domain(CONST)
    if any(d.kind == INPUT for d in live):
        return Domain(FLOAT)  # the raw input mixed with quantized values
    if kind == "keep" and len(live) == 1:
        return live[0]
    if kind in ("affine", "keep") or (kind == "scalar" and len(live) == 1):
        return Domain(ACC)
    return Domain(FLOAT)  # e.g. a product of two activations, a sigmoid


@dataclass(frozen=True)
class FloatWeightOp:
    """An op with learned weights that no pass quantizes: it stays in float, and says so."""

    node: str
    kind: str
    params: int
    reason: str


# Functions whose weight operand, when a Parameter, makes the call a weight-bearing layer.
_WEIGHT_FUNCTIONS = {
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", F.linear: "linear",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d", F.embedding: "embedding", F.bilinear: "bilinear",
}
# Products that are a linear layer when one operand is a Parameter (the front end rewrites the simple ones).
_MATMUL_FUNCTIONS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.addmm: "addmm", torch.bmm: "bmm"}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def float_weight_ops(gm: fx.GraphModule, skip: tuple[type, ...] = ()) -> list[FloatWeightOp]:
    """Ops holding weight matrices (dim >= 2) that are not quantized compute layers, in graph order.

    Normalisation layers (per-channel affine vectors) and modules of the ``skip`` types
    (the quantizers themselves, whose ASQ adapters have small weight matrices) are not
    counted: they are not layers a user expects at the requested width.
    """
    found = []
    for node in gm.graph.nodes:
        if ir.LAYER in node.meta:
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _NORMS + skip):
                continue
            weights = [p for p in m.parameters() if p.dim() >= 2]
            if weights:
                found.append(FloatWeightOp(node.name, type(m).__name__.lower(), sum(p.numel() for p in m.parameters()),
                                           float_module_reason(m)))
        elif node.op == "call_function" and (node.target in _WEIGHT_FUNCTIONS or node.target in _MATMUL_FUNCTIONS):
            params = [_parameter(gm, a.target) for a in node.all_input_nodes if a.op == "get_attr"]
            params = [p for p in params if p is not None and p.dim() >= 2]
            name = _WEIGHT_FUNCTIONS.get(node.target) or _MATMUL_FUNCTIONS[node.target]
            # a layer call the front end left in float carries its reason (qcompiler.functional_layers),
            # also when its weight is not a Parameter; a product of two activations is no weight op
            refused = node.meta.get(ir.FLOAT) if node.target in FORMS or node.target is torch.addmm else None
            if params or (refused is not None and node.target in _WEIGHT_FUNCTIONS):
                reason = refused.reason if refused is not None else f"functional {name} with a Parameter weight has no quantized form here"
                found.append(FloatWeightOp(node.name, name, sum(p.numel() for p in params), reason))
    return found


def float_module_reason(m: nn.Module) -> str:
    """Why the module ``m``, holding weights, is not a quantized compute layer, in words a user can act on."""
    from .frontend import LAYER_KINDS, layer_base  # the front end imports this module's users
    from .nn.attention import unsupported_reason

    name, base = type(m).__name__, layer_base(m)
    if base is not None and type(m).forward is not base.forward:
        return (f"{name} subclasses nn.{base.__name__} but overrides forward, so it may not compute a "
                f"{LAYER_KINDS[base]}; it runs as written, in float")
    if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
        return (f"{name} is a recurrent layer: its gates and state would need requantizing at every time step, "
                "which no pass does, so it stays float")
    if isinstance(m, nn.MultiheadAttention):
        return unsupported_reason(m) or f"{name} was not replaced by its traceable form (a call the front end did not see)"
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        return f"{name} with max_norm rewrites its rows as it reads them, so it stays float"
    return f"{name} has no quantized form here"


def _parameter(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    try:
        return gm.get_parameter(target)
    except AttributeError:  # a buffer or a plain tensor attribute: not a learned weight
        return None


__all__ = ["to_networkx", "first_layers", "last_layers", "to_dot", "Domain", "tensor_domains", "join_operands", "FloatWeightOp", "float_weight_ops", "float_module_reason", "avg_pool_call", "max_pool_call",
           "BATCH_NORMS", "MAX_POOLS", "AVG_POOLS", "ADAPTIVE_AVG_POOLS"]
