"""The HTML report: what each layer's quantizers chose, drawn over the data they quantize.

``write_html_report(compiled, DIR, calib_data=..., program=...)`` (also
``Compiled.write_report`` and ``qcompile ... --report DIR``) writes ``DIR/index.html``
and its figures, PNG files beside it:

* the per-layer bit map (weight and activation bits of every compute layer);
* per layer: a histogram of the float weights with the grid's levels drawn over it
  (uniform codes, POT / POST levels ``±alpha base^-k``, an adder layer's group
  ranges), a histogram of the layer's input over the calibration data with the
  activation grid and the clip range, and for ASQ the distribution of the adapter's
  per-sample factor ``beta``; a table of the steps, clip ranges and observed ranges;
* the residual stream's quantizers, the float regions (with the reason of each),
  the passes' own sections, and the integer program's cost tables when one is given.

Everything drawn is read from the records (:mod:`qcompiler.ir`) after ``freeze`` and
the levels come from :mod:`qcompiler.numerics`, the functions the quantizers use,
so the page shows what a backend deploys. The page loads nothing from elsewhere (no
script, stylesheet or font): it opens offline. Every figure goes through
:func:`save_figure`, which refuses one without a title and labelled axes.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx

from . import ir, numerics
from .errors import QCompileError
from .nn.layout import channel_weight
from .quantizers.asq import beta_float64
from .report import CompileReport, LayerReport

if TYPE_CHECKING:  # matplotlib is imported when a report is drawn, never by the CLI's startup
    from matplotlib.figure import Figure as MplFigure

    from .api import Compiled
    from .runtime.cost import CostReport
    from .runtime.program import Program

# What a report folder holds: ``check_replaceable`` refuses to replace anything else.
REPORT_FILES = ("index.html", "*.png")
MAX_VALUES = 200_000  # values kept per tensor for its histogram: enough for 100 bins, bounded memory
MAX_DRAWN_LEVELS = 64  # more levels than this are a solid block: only the clip bounds are drawn
MAX_LEGEND_GROUPS = 8  # adder group ranges named in the legend; more are drawn but not named
DPI = 90


# --------------------------------------------------------------------------- what the page holds


@dataclass(frozen=True)
class Figure:
    """One PNG of the page, as drawn: its file (relative to the page), title, axis labels
    and the number of data values behind it (never zero: an empty figure is not drawn)."""

    file: str
    title: str
    xlabel: str
    ylabel: str
    values: int


@dataclass(frozen=True)
class HtmlReport:
    """What :func:`write_html_report` wrote."""

    page: Path  # index.html
    figures: tuple[Figure, ...]


@dataclass(frozen=True)
class Bound:
    """A bold vertical line: a clip bound, a group range. One with an empty label has no
    legend entry (the negative side of a symmetric bound, drawn in the same colour)."""

    x: float
    label: str = ""
    colour: str = "#c44e52"
    style: str = "--"


@dataclass(frozen=True)
class Grid:
    """Where a quantizer puts values, in the units of the figure's x axis.

    ``levels`` are the values codes stand for (drawn as thin lines when there are at
    most ``MAX_DRAWN_LEVELS``); ``bounds`` are drawn boldly.
    """

    label: str
    levels: np.ndarray
    bounds: tuple[Bound, ...]


@dataclass
class Observed:
    """A tensor over the calibration data: a bounded random sample of its values,
    its exact extremes, and for an ASQ quantizer's input each sample's ``beta``."""

    sample: list[np.ndarray] = field(default_factory=list)
    count: int = 0
    clipped: int = 0  # values beyond half a step outside the (per-sample) clip range
    lo: float = math.inf
    hi: float = -math.inf
    betas: list[np.ndarray] = field(default_factory=list)

    def values(self) -> np.ndarray:
        return np.concatenate(self.sample) if self.sample else np.zeros(0)

    def beta(self) -> np.ndarray:
        return np.concatenate(self.betas) if self.betas else np.zeros(0)


# --------------------------------------------------------------------------- data over the calibration batches


def quantizer_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose *input* the report histograms: activation quantizers and quantized adder
    layers (which quantize their input inside, on their group grids)."""
    return [n for n in gm.graph.nodes if ir.ACT in n.meta or ir.ADDER_Q in n.meta]


def observe_inputs(gm: fx.GraphModule, batches: Sequence[torch.Tensor], nodes: Sequence[fx.Node],
                   max_values: int = MAX_VALUES, seed: int = 0) -> dict[str, Observed]:
    """Run ``batches`` through ``gm`` (eval mode, no gradients) and observe the input of each of ``nodes``.

    An ``fx.Interpreter`` rather than module hooks: it sees each node once, also
    where two nodes call one module.
    """
    watched = {n.name: Observed() for n in nodes}
    per_batch = max(1, max_values // max(len(batches), 1))
    generator = torch.Generator().manual_seed(seed)

    class Watch(fx.Interpreter):
        def run_node(self, n: fx.Node):
            if n.name in watched:
                x = self.env[n.args[0]]
                _observe(watched[n.name], n, x.detach(), per_batch, generator)
            return super().run_node(n)

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for x in batches:
                Watch(gm).run(x)
    finally:
        gm.train(was_training)
    return watched


def _observe(obs: Observed, node: fx.Node, x: torch.Tensor, keep: int, generator: torch.Generator) -> None:
    flat = x.reshape(-1)
    idx = torch.randint(flat.numel(), (min(keep, flat.numel()),), generator=generator)
    obs.sample.append(flat[idx].double().numpy())
    obs.count += flat.numel()
    obs.lo, obs.hi = min(obs.lo, float(flat.min())), max(obs.hi, float(flat.max()))
    frozen = ir.find(node, ir.STEP, ir.FrozenAct)
    if frozen is None:  # an adder layer: each group clips differently, see its table
        return
    step = torch.as_tensor(frozen.sample_steps(x.dim()))  # a scalar, or per channel (1, C, 1, ...)
    if frozen.adapter is not None:
        beta = adapter_beta(frozen.adapter, x)
        obs.betas.append(beta.numpy())
        step = step * beta.view(-1, *([1] * (x.dim() - 1)))
    v = x.double() / step
    obs.clipped += int(((v > frozen.qmax + 0.5) | (v < frozen.qmin - 0.5)).sum())


def adapter_beta(adapter: ir.FrozenAdapter, x: torch.Tensor) -> torch.Tensor:
    """Each sample's ``beta`` from the frozen adapter, by the quantizer's own function (float64)."""
    weights = (adapter.fc1_weight, adapter.fc1_bias, adapter.fc2_weight, adapter.fc2_bias)
    return beta_float64(x, weights, adapter.feature_axis)


# --------------------------------------------------------------------------- grids, from the records


@dataclass(frozen=True)
class WeightView:
    values: np.ndarray  # the float weights, in the grid's units
    grid: Grid
    xlabel: str


def weight_view(gm: fx.GraphModule, layer: fx.Node) -> WeightView | None:
    """A quantized layer's float weights and its grid, in units where every channel's grid is the same.

    Per-channel steps differ, so uniform weights are drawn divided by their channel's
    step (levels at the integer codes) and power-grid weights divided by their
    channel's ``alpha`` (levels ``±base^-k``). Adder groups share their range with
    the layer's input, so adder weights stay in their own units with each group's range.
    """
    codes = ir.find(layer, ir.CODES, ir.WeightCodes)
    if codes is None:
        return None
    weight = channel_weight(gm.get_submodule(layer.target)).detach().double()
    scales = ir.find(layer, ir.ADDER_Q, ir.AdderScales)
    if scales is not None:
        bounds = tuple(b for g, r in enumerate(scales.group_ranges)
                       for b in (Bound(-r, _group_label(g), _group_colour(g)), Bound(r, "", _group_colour(g))))
        return WeightView(weight.reshape(-1).numpy(), Grid("", np.zeros(0), bounds), "weight")
    per_channel = weight / codes.scale.double().reshape(-1, *([1] * (weight.dim() - 1)))
    if codes.grid in numerics.GRID_BASES:
        magnitudes = numerics.power_levels(codes.bits, codes.base, torch.float64).numpy()
        levels = np.union1d(-magnitudes, magnitudes)
        name = "√2" if codes.grid == "post" else "2"
        return WeightView(per_channel.reshape(-1).numpy(),
                          Grid(f"{codes.grid.upper()} levels ±{name}^-k", levels, (Bound(-1.0, "clip ±alpha"), Bound(1.0))),
                          "weight / alpha of its output channel")
    levels = np.arange(codes.qmin, codes.qmax + 1, dtype=np.float64)
    return WeightView(per_channel.reshape(-1).numpy(),
                      Grid(f"{codes.bits}-bit codes", levels, (Bound(codes.qmin, "clip"), Bound(codes.qmax))),
                      "weight / step of its output channel")


def act_grid(frozen: ir.FrozenAct, betas: np.ndarray) -> Grid:
    """An activation quantizer's levels ``step * k``; for ASQ at ``beta = 1``, with the clip
    bound also drawn at the smallest and largest ``beta`` the calibration data gave."""
    steps = np.asarray(frozen.step, dtype=np.float64)
    # per-channel steps (a join operand): the levels of the median channel stand for them
    levels = float(np.median(steps)) * np.arange(frozen.qmin, frozen.qmax + 1, dtype=np.float64)
    at = " at β=1" if frozen.adapter is not None else f" of the median of {steps.size} channel steps" if steps.ndim else ""
    bounds = [Bound(levels[-1], f"clip{at}")] + ([Bound(levels[0])] if frozen.qmin != 0 else [])
    if frozen.adapter is not None and len(betas):
        for label, beta, colour in (("smallest", betas.min(), "#8172b3"), ("largest", betas.max(), "#937860")):
            bounds.append(Bound(levels[-1] * float(beta), f"clip at the {label} β", colour, ":"))
            if frozen.qmin != 0:
                bounds.append(Bound(levels[0] * float(beta), "", colour, ":"))
    return Grid(f"levels{at}", levels, tuple(bounds))


def adder_input_grid(scales: ir.AdderScales) -> Grid:
    """An adder layer's input grid: unsigned codes up to each group's range ``r_g``, and ``r_x``."""
    bounds = [Bound(r, _group_label(g), _group_colour(g)) for g, r in enumerate(scales.group_ranges)]
    return Grid("", np.zeros(0), (Bound(scales.input_range, "input range r_x", "#222222", ":"), *bounds))


def _group_label(g: int) -> str:
    """Groups past ``MAX_LEGEND_GROUPS`` are drawn but not named: the legend would hide the plot."""
    if g < MAX_LEGEND_GROUPS:
        return f"group {g} range"
    return "more group ranges" if g == MAX_LEGEND_GROUPS else ""


def _group_colour(g: int) -> str:
    palette = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
    return palette[g % len(palette)]


# --------------------------------------------------------------------------- figures


def new_figure(width: float, height: float):
    """A figure and its one axes, outside pyplot: no global backend or figure registry is
    touched (a user's notebook keeps its own), and nothing needs closing."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height))
    return fig, fig.subplots()


def save_figure(fig: MplFigure, path: Path, values: int) -> Figure:
    """Write ``fig`` to ``path`` as PNG; refuses a figure with an untitled or unlabelled axes, or no data."""
    for ax in fig.axes:
        missing = [what for what, text in (("title", ax.get_title()), ("x label", ax.get_xlabel()),
                                           ("y label", ax.get_ylabel())) if not text]
        if missing:
            raise ValueError(f"figure {path.name} has no {', '.join(missing)}: every figure is titled with labelled axes")
    if values <= 0:
        raise ValueError(f"figure {path.name} has no data")
    ax = fig.axes[0]
    fig.savefig(path, dpi=DPI, format="png")  # Agg, whatever backend pyplot uses
    return Figure(path.name, ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), values)


def _log_y(ax) -> None:
    """A log y axis with plain tick labels: the default ones go through mathtext, a tenth of the report's time."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def slug(name: str) -> str:
    """A node name as part of a file name: letters, digits and dashes.

    >>> slug("stages_0_conv1-input"), slug("_3-weights")
    ('stages-0-conv1-input', '3-weights')
    """
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


class Figures:
    """Numbers and writes the page's figures into one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Figure] = []

    def _path(self, name: str) -> Path:
        return self.folder / f"{len(self.written):03d}-{slug(name)}.png"

    def _save(self, fig: MplFigure, name: str, values: int) -> Figure:
        figure = save_figure(fig, self._path(name), values)
        self.written.append(figure)
        return figure

    def histogram(self, name: str, values: np.ndarray, grid: Grid, title: str, xlabel: str,
                  log: bool = False) -> Figure | None:
        """A histogram of ``values`` with ``grid`` drawn over it; ``None`` when there is nothing to draw."""
        values = values[np.isfinite(values)]
        if len(values) == 0:
            return None
        fig, ax = new_figure(6.4, 3.0)
        fig.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.9)  # fixed: a layout engine costs 2x the drawing
        span = [float(values.min()), float(values.max()), *(b.x for b in grid.bounds)]
        lo, hi = min(span), max(span)
        counts, edges = np.histogram(values, bins=100, range=(lo, hi) if hi > lo else (lo - 0.5, hi + 0.5))
        # one filled outline, not 100 bar patches: drawing bars was most of the report's time
        ax.stairs(counts, edges, fill=True, color="#4c72b0", label="values")
        if log:
            _log_y(ax)
        if 0 < len(grid.levels) <= MAX_DRAWN_LEVELS:  # one collection: an artist per level is slow to draw
            ax.vlines(grid.levels, 0, 1, transform=ax.get_xaxis_transform(), color="#dd8452", lw=0.7, alpha=0.8,
                      label=grid.label)
        elif len(grid.levels):
            ax.plot([], [], " ", label=f"{len(grid.levels)} levels (too dense to draw)")
        for b in grid.bounds:
            ax.axvline(b.x, color=b.colour, lw=1.6, ls=b.style, label=b.label or None)
        ax.xaxis.get_major_formatter().set_useOffset(False)  # β near 1 would read "+1" beside the axis
        ax.set(title=title, xlabel=xlabel, ylabel="count (log scale)" if log else "count")
        ax.legend(fontsize=7, loc="upper right")
        return self._save(fig, name, len(values))

    def bars(self, name: str, labels: Sequence[str], series: dict[str, Sequence[float]], title: str,
             xlabel: str, ylabel: str, log: bool = False, hatched: dict[str, Sequence[bool]] | None = None) -> Figure | None:
        """Grouped bars, one group per label; ``hatched`` marks bars standing for something else (float)."""
        if not labels:
            return None
        width_in = max(6.4, 0.28 * len(labels) + 1.5)
        fig, ax = new_figure(width_in, 4.2)
        longest = max(len(str(label)) for label in labels)  # rotated tick labels need this much room below
        fig.subplots_adjust(left=0.95 / width_in, right=1 - 0.2 / width_in, top=0.92, bottom=min(0.6, 0.12 + 0.012 * longest))
        width = 0.8 / len(series)
        x = np.arange(len(labels))
        for i, (label, heights) in enumerate(series.items()):
            bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
            for bar, hatch in zip(bars, (hatched or {}).get(label, ()), strict=False):
                if hatch:
                    bar.set_hatch("//")
                    bar.set_alpha(0.45)
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        if log:
            _log_y(ax)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=7)
        return self._save(fig, name, len(labels) * len(series))


# --------------------------------------------------------------------------- HTML


def esc(v: object) -> str:
    return html.escape(str(v))


def html_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """
    >>> html_table(("a", "b"), [(1, "<x>")])
    '<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>&lt;x&gt;</td></tr></table>'
    """
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def html_figure(figure: Figure | None) -> str:
    if figure is None:
        return ""
    return f'<figure><img src="{esc(figure.file)}" alt="{esc(figure.title)}"></figure>'


def _g(v: float) -> str:
    return f"{v:.4g}"


STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
th { background: #eee; }
section.layer { border-top: 2px solid #888; margin-top: 1.5em; }
figure { display: inline-block; margin: 0.3em; }
img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
nav a { margin-right: 0.8em; font-size: 0.85em; }
"""


def page(title: str, body: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- sections


def bit_map_section(report: CompileReport, figures: Figures) -> str:
    layers = report.layers
    fp32 = 32  # a float layer's bar: drawn hatched at float32's width

    def heights(bits: Sequence[int | None]) -> list[float]:
        return [b if b is not None else fp32 for b in bits]

    wbits, abits = [r.weight_bits for r in layers], [r.act_bits for r in layers]
    fig = figures.bars(
        "bit-map", [r.name for r in layers], {"weight bits": heights(wbits), "activation bits": heights(abits)},
        "Bits per layer (hatched: float32)", "layer (graph order)", "bits",
        hatched={"weight bits": [b is None for b in wbits], "activation bits": [b is None for b in abits]},
    )
    rows = [(r.name, r.kind, r.weight_bits or "fp32", r.act_bits or "fp32", r.weight_quantizer, r.act_quantizer,
             r.pinned, r.params, r.macs) for r in layers]
    head = ("layer", "kind", "w-bits", "a-bits", "weight quantizer", "act quantizer", "pinned", "params", "MACs")
    return '<section id="bits"><h2>Bit map</h2>' + html_figure(fig) + html_table(head, rows) + "</section>"


def float_section(report: CompileReport) -> str:
    if report.float_regions:
        body = html_table(("node", "why it runs in float"), report.float_regions)
    else:
        body = '<p class="note">None: every edge after the input quantizer is on an integer grid.</p>'
    return f'<section id="float"><h2>Float regions</h2><pre>{esc(report.domain_summary())}</pre>{body}</section>'


def weight_rows(gm: fx.GraphModule, layer: fx.Node) -> list[tuple[str, str]]:
    codes = ir.find(layer, ir.CODES, ir.WeightCodes)
    wq = ir.find(layer, ir.WEIGHT, ir.WeightQuant)
    if codes is None or wq is None:
        return [("weights", "float (not quantized)")]
    scale = codes.scale.double()
    name = "alpha" if codes.grid in numerics.GRID_BASES else "step"
    used = int(torch.unique(codes.codes).numel())
    rows = [("weight grid", f"{wq.grid} {wq.granularity}, {codes.bits} bits, codes {codes.qmin}..{codes.qmax}, "
                            f"{name}s initialised by {wq.init}"),
            (f"weight {name} (min / median / max over channels)",
             f"{_g(scale.min())} / {_g(scale.median())} / {_g(scale.max())}"),
            ("distinct codes used", f"{used} of {codes.qmax - codes.qmin + 1}")]
    if codes.max_exponent >= 0:
        rows.append(("largest exponent k used", str(codes.max_exponent)))
    return rows


def act_rows(source: fx.Node | None, quantizer: fx.Node, obs: Observed | None) -> list[tuple[str, str]]:
    """The activation grid's numbers: what calibration saw, the step and clip range it led to."""
    rows = []
    rng = ir.find(source, ir.RANGE, ir.TensorRange) if source is not None else None
    if rng is not None:
        rows.append(("observed at calibration (min / max / |x| p99.9)", f"{_g(rng.min)} / {_g(rng.max)} / {_g(rng.abs_p999)}"))
    frozen = ir.find(quantizer, ir.STEP, ir.FrozenAct)
    if frozen is not None:
        act = ir.get(quantizer, ir.ACT, ir.ActQuant)
        rows.append(("activation quantizer", f"{act.method} {act.grid_kind}, "
                                             f"{frozen.bits} bits, step initialised by {act.init}"))
        at = " (at β=1)" if frozen.adapter is not None else ""
        if frozen.channel_axis is None:
            rows.append((f"step{at}", _g(frozen.step)))
            rows.append((f"clip range{at}", f"[{_g(frozen.qmin * frozen.step)}, {_g(frozen.qmax * frozen.step)}]"))
        else:
            lo, hi = min(frozen.step), max(frozen.step)
            rows.append(("steps", f"{len(frozen.step)}, one per channel (axis {frozen.channel_axis}): {_g(lo)} to {_g(hi)}"))
            rows.append(("clip range", f"per channel, widest [{_g(frozen.qmin * hi)}, {_g(frozen.qmax * hi)}]"))
    scales = ir.find(quantizer, ir.ADDER_Q, ir.AdderScales)
    if scales is not None:
        clamp = ir.find(quantizer, ir.ADDER_IN, ir.ClampRange)
        how = f"the {clamp.alpha} quantile of |x|, max over {clamp.batches} batches" if clamp else "observed maximum"
        rows.append(("input range r_x", f"{_g(scales.input_range)} ({how})"))
        rows.append((f"{len(scales.group_ranges)} scale group range(s) r_g", ", ".join(_g(r) for r in scales.group_ranges)))
        rows.append(("activation / weight bits", f"{scales.act_bits} unsigned / {scales.weight_bits} signed, "
                                                 f"weight step = {scales.weight_step_ratio} × act step"))
    if obs is not None and obs.count:
        rows.append(("input over the report's calibration data (min / max)", f"{_g(obs.lo)} / {_g(obs.hi)}"))
        if frozen is not None:
            rows.append(("clipped (beyond half a step outside the clip range)", f"{100 * obs.clipped / obs.count:.3f} %"))
        beta = obs.beta()
        if len(beta):
            rows.append(("β over the calibration samples (min / median / max)",
                         f"{_g(beta.min())} / {_g(np.median(beta))} / {_g(beta.max())}"))
    return rows


def input_figures(name: str, quantizer: fx.Node, obs: Observed | None, figures: Figures) -> list[Figure | None]:
    """The input histogram with its grid, and for ASQ the ``beta`` histogram."""
    if obs is None or not obs.count:
        return []
    frozen = ir.find(quantizer, ir.STEP, ir.FrozenAct)
    scales = ir.find(quantizer, ir.ADDER_Q, ir.AdderScales)
    grid = act_grid(frozen, obs.beta()) if frozen is not None else adder_input_grid(scales)
    out = [figures.histogram(f"{name}-input", obs.values(), grid, f"{name}: input over the calibration data",
                             "activation value", log=True)]
    beta = obs.beta()
    if len(beta):
        out.append(figures.histogram(f"{name}-beta", beta, Grid("", np.zeros(0), (Bound(1.0, "β = 1 (the learned step)", "#222222"),)),
                                     f"{name}: ASQ β per calibration sample", "β (step factor)"))
    return out


def layer_section(gm: fx.GraphModule, layer: fx.Node, row: LayerReport, observed: dict[str, Observed],
                  figures: Figures | None) -> str:
    """One compute layer: its numbers, and (with ``figures``) its weight and input histograms."""
    src = layer.args[0] if layer.args and isinstance(layer.args[0], fx.Node) else None
    quantizer = src if src is not None and ir.ACT in src.meta else (layer if ir.ADDER_Q in layer.meta else None)
    rows = weight_rows(gm, layer)
    if quantizer is not None:
        source = quantizer.args[0] if quantizer is src else src
        rows += act_rows(source, quantizer, observed.get(quantizer.name))
        if quantizer is src:
            rows.append(("input quantizer node", f"{src.name} (shared by every layer reading it)"))
    else:
        rows.append(("input", "float (not quantized)"))
    if row.pinned:
        rows.append(("pinned", row.pinned))
    parts = [f'<section class="layer" id="{esc(layer.name)}"><h3>{esc(layer.name)} '
             f'<span class="note">({esc(row.kind)}, W{row.weight_bits or "fp32"} A{row.act_bits or "fp32"})</span></h3>',
             html_table(("", ""), rows)]
    if figures is None:
        parts.append('<p class="note">Figures omitted (layer beyond max_layers).</p>')
    else:
        view = weight_view(gm, layer)
        if view is not None:
            parts.append(html_figure(figures.histogram(
                f"{layer.name}-weights", view.values, view.grid, f"{layer.name}: weights and their grid", view.xlabel)))
        if quantizer is not None:
            parts += [html_figure(f) for f in input_figures(layer.name, quantizer, observed.get(quantizer.name), figures)]
    return "".join(parts) + "</section>"


def joins_section(gm: fx.GraphModule, observed: dict[str, Observed], figures: Figures) -> str:
    """The residual stream's quantizers (residual adds and concats), each over the calibration data."""
    nodes = [n for n in ir.act_quantizers(gm) if ir.get(n, ir.ACT, ir.ActQuant).role == "join"]
    if not nodes:
        return ""
    parts = ['<section id="joins"><h2>Residual stream quantizers</h2>']
    for n in nodes:
        obs = observed.get(n.name)
        parts.append(f"<h3>{esc(n.name)}</h3>" + html_table(("", ""), act_rows(n.args[0], n, obs)))
        parts += [html_figure(f) for f in input_figures(n.name, n, obs, figures)]
    return "".join(parts) + "</section>"


def cost_section(costs: CostReport, figures: Figures) -> str:
    names = [lc.layer for lc in costs.layers]
    def pj(v: float) -> float:
        return v if v > 0 else math.nan  # no bar, rather than a bar down to the log axis' floor

    fig = figures.bars("energy", names, {"integer program": [pj(lc.energy_pj) for lc in costs.layers],
                                         "float32": [pj(lc.float_energy_pj) for lc in costs.layers]},
                       "Energy per sample by layer: integer program vs float32 (45 nm)", "layer (program order)",
                       "energy (pJ, log scale)", log=True)
    rows = [(lc.layer, f"{lc.energy_pj:.1f}", f"{lc.float_energy_pj:.1f}", lc.traffic_bits, lc.float_traffic_bits,
             ", ".join(f"{k} {v}" for k, v in sorted(lc.counts.items()))) for lc in costs.layers]
    head = ("layer", "energy pJ", "float32 pJ", "traffic bits", "float32 traffic bits", "operations")
    return ('<section id="costs"><h2>Integer program costs (per sample)</h2>' + html_figure(fig)
            + html_table(head, rows) + f"<pre>{esc(costs.text())}</pre></section>")


def passes_section(report: CompileReport) -> str:
    parts = ['<section id="passes"><h2>Passes</h2>', f"<pre>{esc(report.pass_table())}</pre>"]
    parts += [f"<h3>{esc(s.title)}</h3><pre>{esc(s.table)}</pre>" for s in report.sections]
    return "".join(parts) + "</section>"


# --------------------------------------------------------------------------- the page


def write_html_report(compiled: Compiled, out_dir: str | Path, calib_data: object = None,
                      program: Program | None = None, max_layers: int | None = 100,
                      progress: bool = False) -> HtmlReport:
    """Write ``out_dir/index.html`` and its PNG figures; returns the page and its figures.

    Args:
        compiled: the compiled model (frozen first, so the page shows current values).
        out_dir: a new folder, or one holding an earlier report (anything else is refused).
        calib_data: what the activation histograms and ASQ's ``beta`` are drawn over, in
            any form ``compile`` takes; the spec's ``calib_batches`` batches of it. Without
            it the page has weights, bits, float regions and costs only.
        program: the integer program (``compiled.lower()``): adds its cost tables, taken
            from a run on one sample (costs depend on shapes only).
        max_layers: draw figures for at most this many compute layers (tables for all).

    The folder is written beside ``out_dir`` and moved into place, so a failure
    leaves no partial report.
    """
    from .api import calibration_batches, check_replaceable
    from .atomic import staged_folder

    out = Path(out_dir)
    check_replaceable(out, REPORT_FILES, "report folder")
    compiled.freeze()
    gm, spec, report = compiled.module, compiled.spec, compiled.report
    batches = calibration_batches(calib_data, spec.calib_batches, spec.seed)
    observed = observe_inputs(gm, batches, quantizer_inputs(gm), seed=spec.seed) if batches else {}
    with staged_folder(out) as tmp:
        figures = Figures(tmp)
        sections = [bit_map_section(report, figures), float_section(report), "<h2>Layers</h2>"]
        rows = dict(zip((r.name for r in report.layers), report.layers, strict=True))
        for i, layer in enumerate(_progress(ir.compute_layers(gm), progress)):
            drawn = figures if max_layers is None or i < max_layers else None
            sections.append(layer_section(gm, layer, rows[layer.name], observed, drawn))
        sections.append(joins_section(gm, observed, figures))
        sample = cost_sample(gm, batches) if program is not None else None
        if sample is not None:
            sections.append(cost_section(program.costs(sample), figures))
        sections.append(passes_section(report))
        body = [_header(compiled, batches, sample is not None), _nav(sections), *sections]
        (tmp / "index.html").write_text(page("qcompiler report", body), encoding="utf-8")
    return HtmlReport(out / "index.html", tuple(figures.written))


def cost_sample(gm: fx.GraphModule, batches: Sequence[torch.Tensor]) -> np.ndarray | None:
    """One input sample for the program's cost count, which reads only shapes: the first
    calibration sample, else zeros of the traced input's shape."""
    if batches:
        return batches[0][:1].numpy()
    meta = next((n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"), None)
    return np.zeros((1, *meta.shape[1:]), dtype=np.float32) if meta is not None else None


def _header(compiled: Compiled, batches: Sequence[torch.Tensor], costs: bool) -> str:
    spec = compiled.spec
    samples = sum(len(b) for b in batches)
    data = (f"{samples} calibration samples in {len(batches)} batch(es)" if batches
            else "no calibration data given: no activation histograms, no β")
    pinned = " (pinned layers excepted)" if any(r.pinned for r in compiled.report.layers) else ""
    return (f"<p>Passes <b>{esc(', '.join(spec.passes))}</b>; weights {spec.weight_bits} bits, activations "
            f"{spec.act_bits} bits{pinned}; {len(compiled.report.layers)} compute layers. "
            f"Histograms over {esc(data)}; "
            f"{'the integer program costs are at the end' if costs else 'no integer program given'}.</p>")


def _nav(sections: Sequence[str]) -> str:
    """Links to every section and layer on the page, read from their ``id``s."""
    links = []
    for sec in sections:
        for m in re.finditer(r'<section[^>]* id="([^"]+)"><h[23]>([^<]+)', sec):
            links.append(f'<a href="#{m.group(1)}">{m.group(2).strip()}</a>')
    return f"<nav>{''.join(links)}</nav>"


def _progress(items: list, on: bool) -> Iterator:
    if not on:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc="report", unit="layer"))


__all__ = ["REPORT_FILES", "Figure", "HtmlReport", "save_figure", "write_html_report"]
