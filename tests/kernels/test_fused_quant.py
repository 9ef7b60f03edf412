"""The fused kernels against the eager quantizers they replace.

Forward results and input gradients must be bit-identical (the kernels make the
same decisions on every element); step/alpha gradients are sums, which the kernels
accumulate in another order, so they agree to float32 rounding of the sum.
"""

import contextlib
import copy
import math
import os
import threading
import warnings

import pytest
import torch

from qcompiler import kernels
from qcompiler.numerics import GRID_BASES, grid_thresholds, int_range, power_levels, quantize_float, round_half_even
from qcompiler.quantizers.asq import ASQQuantizer
from qcompiler.quantizers.power_grid import PowerGridQuantizer, _FusedPowerGrid, _grid_values, _kernel_grid, _PowerGrid
from qcompiler.quantizers.uniform import UniformQuantizer, _FusedLSQ, lsq_quantize, positive



def _why_no_kernels() -> str:
    if os.environ.get("QCOMPILER_FUSED", "1") == "0":
        return "QCOMPILER_FUSED=0 switches the fused kernels off (this leg tests the eager quantizers)"
    return "the fused kernels could not be built here (no C++ compiler or ninja; see the RuntimeWarning)"


needs_kernels = pytest.mark.skipif(kernels.fused() is None, reason=_why_no_kernels())


def _run(fn, *leaves):
    """``fn`` on fresh leaf copies: (output, grads of the leaves) for a fixed upstream gradient."""
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*copies)
    out.backward(_upstream(out.shape))
    return out.detach(), [c.grad for c in copies]


def _fused_and_eager(fused_fn, eager_fn, *leaves):
    return _run(fused_fn, *leaves), _run(eager_fn, *leaves)


def _upstream(shape) -> torch.Tensor:
    n = math.prod(shape)
    return torch.linspace(-1.0, 1.0, n).reshape(shape)


def _module_runs(q, x: torch.Tensor, x_grad: bool = True) -> list[tuple]:
    """(output, input gradient, parameter gradients) of module ``q`` on ``x``, with the kernels, then without."""
    runs = []
    for use_kernels in (True, False):
        q.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(x_grad)
        with contextlib.nullcontext() if use_kernels else kernels.disabled():
            out = q(xi)
        out.backward(_upstream(out.shape))
        runs.append((out.detach(), xi.grad, {n: p.grad for n, p in q.named_parameters()}))
    return runs


def _assert_same(fused, eager, step_terms: torch.Tensor, step_shape, grad_scale: float):
    """Outputs and input gradients identical; step gradients both within summation error of the exact sum.

    ``step_terms`` are the per-element terms of the step gradient (float64 products of
    the float32 factors): the exact sum is their float64 sum, and a float32 sum of n
    terms in any order is within ``n * eps * sum|terms|`` of it.
    """
    (out_f, grads_f), (out_e, grads_e) = fused, eager
    assert torch.equal(out_f, out_e)
    assert torch.equal(grads_f[0], grads_e[0])
    exact = step_terms.sum_to_size(step_shape) * grad_scale
    n = step_terms.numel() // max(math.prod(step_shape), 1)
    bound = step_terms.abs().sum_to_size(step_shape) * grad_scale * n * 2.0**-24
    for got in (grads_f[1], grads_e[1]):
        assert ((got.double().reshape(exact.shape) - exact).abs() <= bound + 1e-12).all()


STEP_SHAPES = {  # the raw learned step, and how the eager code broadcasts it
    "per-tensor": (lambda x: torch.tensor(0.07), lambda s, x: s),
    "per-sample": (lambda x: torch.rand(x.shape[0]) * 0.1 + 0.02, lambda s, x: s.view(-1, 1, 1, 1)),
    "per-channel": (lambda x: torch.rand(x.shape[0]) * 0.1 + 0.02, lambda s, x: s.view(-1, 1, 1, 1)),
}


@needs_kernels
@pytest.mark.parametrize("layout", sorted(STEP_SHAPES))
@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (4, True), (8, True), (16, True)])
def test_lsq_kernel_matches_eager(layout, bits, signed):
    torch.manual_seed(bits)
    x = torch.randn(6, 5, 7, 9) * 0.4
    make_step, broadcast = STEP_SHAPES[layout]
    step = make_step(x)
    # exact rounding ties and exact clamp bounds, where the decisions are made
    first = float(step.reshape(-1)[0])
    x.view(-1)[:40] = (torch.arange(-20, 20) + 0.5) * first
    qmin, qmax = int_range(bits, signed)
    x.view(-1)[40:42] = torch.tensor([qmin, qmax]) * first
    x.view(-1)[42:44] = torch.tensor([1e6, -1e6])

    def fused(x, step):
        return _FusedLSQ.apply(x, step, qmin, qmax, 0.3, kernels.fused())

    def eager(x, step):
        return lsq_quantize(x, positive(broadcast(step, x)), qmin, qmax, 0.3, keep_grads=layout == "per-channel")

    v = x / broadcast(step, x)
    clamped = v.clamp(qmin, qmax)
    dstep = torch.where(clamped == v, round_half_even(clamped) - v, clamped)  # the LSQ step gradient factor
    terms = dstep.double() * _upstream(x.shape).double()
    _assert_same(*_fused_and_eager(fused, eager, x, step), terms, broadcast(step, x).shape, 0.3)


def _grid_probe(bits: int, base: float, alpha: torch.Tensor, shape) -> torch.Tensor:
    """Random weights plus every level, every midpoint between levels, and its float32 neighbours."""
    levels = power_levels(bits, base, torch.float64)
    mids = (levels[1:] + levels[:-1]) / 2
    special = torch.cat([levels, mids]).float()
    special = torch.cat([special, torch.nextafter(special, torch.tensor(2.0)), torch.nextafter(special, torch.tensor(-1.0))])
    special = torch.cat([special, -special, torch.tensor([0.0, -0.0, 1.5, 7.0, 1e-30])])
    w = torch.randn(shape) * alpha.view(-1, *([1] * (len(shape) - 1)))
    flat = w.view(shape[0], -1)
    n = min(special.numel(), flat.shape[1])
    flat[:, :n] = special[:n] * alpha.view(-1, 1)  # exact multiples of alpha up to float32 rounding
    return w


def _power_grid_paths(bits: int, grid: str, scale: float):
    base = GRID_BASES[grid]

    def fused(w, alpha):
        return _FusedPowerGrid.apply(w, alpha, _kernel_grid(bits, base), scale, kernels.fused())

    def eager(w, alpha):
        return _PowerGrid.apply(w, positive(alpha).view(-1, *([1] * (w.dim() - 1))), bits, base, scale)

    return fused, eager


@needs_kernels
@pytest.mark.parametrize("grid", sorted(GRID_BASES))
@pytest.mark.parametrize("bits", range(2, 9))
def test_power_grid_kernel_matches_eager(grid, bits):
    torch.manual_seed(bits)
    alpha = torch.tensor([1.0, 0.5, 0.37, 2.0])  # two powers of two: exact midpoints survive the division
    w = _grid_probe(bits, GRID_BASES[grid], alpha, (4, 300))
    scale = 1 / math.sqrt(w.shape[1] * (2 ** (bits - 1) - 1))
    fused, eager = _power_grid_paths(bits, grid, scale)

    u = w / alpha.view(-1, 1)
    with torch.no_grad():
        levels = eager(w, alpha) / alpha.view(-1, 1)  # exact: alpha * level / alpha
    dalpha = torch.where(u.abs() <= 1, levels - u, levels)
    terms = dalpha.double() * _upstream(w.shape).double()
    _assert_same(*_fused_and_eager(fused, eager, w, alpha), terms, (4, 1), scale)


@needs_kernels
@pytest.mark.parametrize("make", [
    lambda: UniformQuantizer(4, signed=True),
    lambda: UniformQuantizer(4, signed=True, channels=6),
    lambda: PowerGridQuantizer(4, "post", channels=6),
    lambda: ASQQuantizer(3, signed=False, channels=5),
], ids=["lsq-tensor", "lsq-channel", "post", "asq"])
def test_quantizer_modules_train_alike_with_and_without_kernels(make):
    """Same outputs, same gradients for the input and every parameter, through the public modules."""
    torch.manual_seed(0)
    q = make()
    x = torch.rand(6, 5, 4, 4) if isinstance(q, ASQQuantizer) else torch.randn(6, 5, 3, 3)
    q.init_from(x)
    if isinstance(q, ASQQuantizer):
        torch.nn.init.normal_(q.adapter.fc2.weight, std=0.5)  # beta far from 1, so its gradients matter
    (out_f, gx_f, gp_f), (out_e, gx_e, gp_e) = _module_runs(q, x)
    assert torch.equal(out_f, out_e)
    torch.testing.assert_close(gx_f, gx_e, rtol=1e-5, atol=1e-7)
    assert gp_f.keys() == gp_e.keys()
    for name in gp_e:
        torch.testing.assert_close(gp_f[name], gp_e[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_kernels
def test_power_grid_kernel_levels_are_the_specified_table():
    """Every level the kernel can produce is exactly ``power_levels`` (float32)."""
    for grid, base in GRID_BASES.items():
        for bits in range(2, 9):
            table = power_levels(bits, base)
            q = PowerGridQuantizer(bits, grid, channels=1)
            out = q(table.view(1, -1)).detach().view(-1)
            assert torch.equal(out, table), (grid, bits)



def _finite_float32_patterns(n: int, seed: int) -> torch.Tensor:
    """``n`` finite float32 values drawn as random bit patterns: every exponent, subnormals, both signs, +-0."""
    bits = torch.randint(0, 2**32, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits
    values = torch.where(values.isfinite(), values, torch.zeros(()))
    values[:4] = torch.tensor([0.0, -0.0, torch.finfo(torch.float32).tiny / 4, -torch.finfo(torch.float32).max])
    return values


@needs_kernels
@pytest.mark.parametrize("grid", sorted(GRID_BASES))
@pytest.mark.parametrize("bits", range(2, 9))
def test_power_grid_kernel_matches_eager_on_every_exponent(grid, bits):
    """The level is made from the quotient's bits (exponent field, mantissa against the midpoints,
    clamped as bits): over weights of every magnitude the kernel's forward and input gradient are
    the eager quantizer's, bit for bit, and so are the levels of tiny and huge quotients."""
    w = _finite_float32_patterns(3 * 4096, seed=bits).view(3, 4096)
    alpha = torch.tensor([1.0, 3e-5, 7e4])  # quotients over- and underflow for some rows' weights
    fused, eager = _power_grid_paths(bits, grid, 0.5)
    (out_f, grads_f), (out_e, grads_e) = _fused_and_eager(fused, eager, w, alpha)
    assert torch.equal(out_f, out_e) and torch.equal(grads_f[0], grads_e[0])


def _every_mantissa(biased_exponent: int) -> torch.Tensor:
    """All 2^23 positive float32 values with this exponent field (0: the subnormals and zero)."""
    return (torch.arange(1 << 23, dtype=torch.int32) | (biased_exponent << 23)).view(torch.float32)


@needs_kernels
@pytest.mark.parametrize("grid", sorted(GRID_BASES))
@pytest.mark.parametrize("bits", [3, 8])
def test_power_grid_kernel_decides_every_mantissa_as_eager(grid, bits):
    """The kernel finds the level with integer carries into the exponent field, the eager code with
    mantissa comparisons: every float32 of the octaves where the decisions change (the subnormals,
    around the smallest level and the zero threshold, around 1) gets the same level from both."""
    base = GRID_BASES[grid]
    smallest = int(power_levels(bits, base)[1].view(torch.int32)) >> 23  # exponent field of base^-kmax
    alpha = torch.ones(1)
    for exponent in sorted({0, smallest - 1, smallest, smallest + 1, 126, 127, 128}):
        w = _every_mantissa(exponent).view(1, -1)
        fused = kernels.fused().power_forward(w, alpha, *_kernel_grid(bits, base))
        eager = _grid_values(w, alpha.view(1, 1), bits, base)
        assert torch.equal(fused.view(torch.int32), eager.view(torch.int32)), (grid, bits, exponent)

CHUNK = 1 << 14  # kChunk in fused_quant.cpp: the unit of work whose partial sums are reduced


def _at_threads(threads: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def _lsq_case(rows: int):
    torch.manual_seed(rows)
    x = torch.randn(rows if rows > 1 else 4, 9, 64, 64) * 0.5  # 36864 per sample: 2.25 chunks a row
    step = torch.rand(rows) * 0.05 + 0.02 if rows > 1 else torch.tensor(0.05)

    def run(x, step):
        return _FusedLSQ.apply(x, step, -8, 7, 0.3, kernels.fused())

    return run, x, step


def _grid_case(grid: str, rows: int):
    torch.manual_seed(rows)
    w = torch.randn(rows, 5 * CHUNK // 2)  # 2.5 chunks a row
    fused, _ = _power_grid_paths(4, grid, 0.1)
    return fused, w, torch.rand(rows) + 0.1


KERNEL_CASES = {  # every entry point of the extension: lsq_forward/backward, power_forward/backward (both grids)
    "lsq per-tensor (1 row, 9 chunks)": lambda: _lsq_case(1),
    "lsq per-row (3 rows x 2.25 chunks)": lambda: _lsq_case(3),
    "pot (1 row x 2.5 chunks)": lambda: _grid_case("pot", 1),
    "pot per-row (3 rows x 2.5 chunks)": lambda: _grid_case("pot", 3),
    "post (1 row x 2.5 chunks)": lambda: _grid_case("post", 1),
    "post per-row (3 rows x 2.5 chunks)": lambda: _grid_case("post", 3),
}


@needs_kernels
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_results_do_not_depend_on_the_thread_count(case):
    """Forward values and both gradients bit-identical at 1 and 2 threads, over several reduction chunks."""
    fn, x, param = KERNEL_CASES[case]()
    assert x.numel() // param.numel() > 2 * CHUNK  # each row's sum combines at least three chunks
    one, two = (_at_threads(t, lambda: _run(fn, x, param)) for t in (1, 2))
    assert torch.equal(one[0], two[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1], two[1]))
    assert bool(one[1][1].ne(0).all())  # the step/alpha gradients really were reduced


@needs_kernels
def test_asq_quantizer_does_not_depend_on_the_thread_count():
    """The fused ASQ node (kernels plus the adapter's backward matmuls), at 1 and 2 threads.

    The quantizer is built once: ``init_from`` uses torch's own reductions, whose
    result may depend on the thread count; this checks the training step only.
    """
    torch.manual_seed(0)
    q = ASQQuantizer(4, signed=False, channels=9)
    x = torch.rand(3, 9, 64, 64)  # 2.25 chunks per sample
    _at_threads(1, lambda: q.init_from(x))
    torch.nn.init.normal_(q.adapter.fc2.weight, std=0.5)

    def run():
        qi = copy.deepcopy(q)
        xi = x.clone().requires_grad_()
        out = qi(xi)
        out.backward(_upstream(out.shape))
        return [out.detach(), xi.grad] + [p.grad for p in qi.parameters()]

    one, two = _at_threads(1, run), _at_threads(2, run)
    assert len(one) == 2 + 5
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_kernels
def test_kernels_are_used_only_where_they_apply():
    k = kernels.fused()
    assert k is not None
    x = torch.randn(4, 3, 5, 5)
    assert kernels.usable(x, torch.tensor(0.1)) is k
    assert kernels.usable(x, torch.rand(4, 1, 1, 1)) is k
    assert kernels.usable(x, torch.rand(1, 3, 1, 1)) is None  # a step per channel of dim 1
    assert kernels.usable(torch.randn(4, 4), torch.rand(4)) is None  # broadcasts along the last dim
    assert kernels.usable(x.double(), torch.tensor(0.1, dtype=torch.float64)) is None
    with kernels.disabled():
        assert kernels.usable(x, torch.tensor(0.1)) is None


def test_environment_switch_disables_the_kernels(monkeypatch):
    monkeypatch.setenv("QCOMPILER_FUSED", "0")
    assert not kernels.enabled()
    assert kernels.fused() is None


def test_a_failed_build_falls_back_to_eager_with_one_warning(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv("QCOMPILER_FUSED", raising=False)  # the build is attempted in both CI legs
    with pytest.warns(RuntimeWarning, match="Ninja is required to load C\\+\\+ extensions\\); using the slower eager"):
        assert kernels.fused() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.fused() is None  # remembered: no second build attempt, no second warning
    x = torch.randn(3, 4)
    assert torch.equal(lsq_quantize(x, torch.tensor(0.25), -8, 7, 1.0), quantize_float(x, 0.25, -8, 7) * 0.25)


def test_grid_thresholds_decide_ties_toward_the_smaller_level():
    g = grid_thresholds(4, math.sqrt(2))
    assert g.mid_low <= (1 + math.sqrt(2)) / 2 < torch.nextafter(torch.tensor(g.mid_low), torch.tensor(2.0)).item()
    pot = grid_thresholds(4, 2.0)
    assert pot.mid_low == 1.5 and pot.zero_below == 2.0**-6 / 2


def test_disabled_is_per_thread_with_two_threads_at_once():
    """One thread inside ``disabled()`` while another, at the same time, is outside it and sees the kernels."""
    inside, checked = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def eager_thread():
        with kernels.disabled():
            inside.set()
            seen["eager, own view"] = kernels.enabled()
            checked.wait(10)
            seen["eager, after the other looked"] = kernels.enabled()
        seen["eager, after the block"] = kernels.enabled()

    def fused_thread():
        inside.wait(10)
        seen["other thread, during the block"] = kernels.enabled()
        checked.set()

    threads = [threading.Thread(target=eager_thread), threading.Thread(target=fused_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    expected_outside = os.environ.get("QCOMPILER_FUSED", "1") != "0"
    assert seen == {
        "eager, own view": False,
        "other thread, during the block": expected_outside,
        "eager, after the other looked": False,
        "eager, after the block": expected_outside,
    }
    assert kernels.enabled() is expected_outside  # this thread never entered the block


@pytest.mark.skipif(os.environ.get("QCOMPILER_FUSED", "1") == "0", reason="QCOMPILER_FUSED=0: nothing to disable per thread")
def test_disabled_blocks_nest_and_stay_in_their_thread():
    with kernels.disabled():
        with kernels.disabled():
            assert not kernels.enabled()
        assert not kernels.enabled()  # the outer block still holds
        box = []
        t = threading.Thread(target=lambda: box.append(kernels.enabled()))
        t.start()
        t.join(10)
        assert box == [True]
    assert kernels.enabled()


ASQ_PARAMS = ("step", "adapter.fc1.weight", "adapter.fc1.bias", "adapter.fc2.weight", "adapter.fc2.bias")


@needs_kernels
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 7), (6, 5, 4, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("frozen", [None, "x", *ASQ_PARAMS])
def test_asq_fused_backward_matches_autograd_with_any_input_frozen(shape, frozen):
    """The hand-written ASQ backward against autograd on the eager path, for linear, 1-d and 2-d
    activations, with beta far from 1 (the tanh's slope matters) and each input frozen in turn:
    a gradient must arrive exactly where it is asked for."""
    torch.manual_seed(len(shape))
    q = ASQQuantizer(3, signed=False, channels=5)
    x = torch.rand(shape) * 2
    q.init_from(x)
    with torch.no_grad():
        torch.nn.init.normal_(q.adapter.fc1.weight, std=0.5)
        q.adapter.fc1.bias.fill_(0.2)  # hidden units on, so fc1 gets gradients
        torch.nn.init.normal_(q.adapter.fc2.weight, std=0.5)
        q.adapter.fc2.bias.fill_(1.5)  # beta ~ 3.5: tanh(z / L) ~ 0.6, far from its linear part
    for name, p in q.named_parameters():
        p.requires_grad_(name != frozen)
    (out_f, gx_f, gp_f), (out_e, gx_e, gp_e) = _module_runs(q, x, x_grad=frozen != "x")
    assert torch.equal(out_f, out_e)
    assert (gx_f is None) == (gx_e is None) == (frozen == "x")
    if gx_e is not None:
        torch.testing.assert_close(gx_f, gx_e, rtol=1e-5, atol=1e-6)
    for name in ASQ_PARAMS:
        assert (gp_f[name] is None) == (gp_e[name] is None) == (name == frozen), name
        if gp_e[name] is not None:
            assert bool(gp_e[name].ne(0).any()), name  # the comparison below is not 0 == 0
            torch.testing.assert_close(gp_f[name], gp_e[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_kernels
@pytest.mark.parametrize("channels,batch", [(8, 4), (512, 256)], ids=["adapter-loops", "adapter-matmuls"])
@pytest.mark.parametrize("shape", ["maps", "tokens"])
def test_asq_fused_backward_on_both_adapter_paths(channels, batch, shape):
    """The fused ASQ backward computes the adapter's products in loops when they are small and
    with matmuls past ``kLoopMacs`` (512 channels, 128 hidden units, a batch of 256): both agree
    with autograd on the eager path, for channels-first maps and for tokens."""
    torch.manual_seed(channels)
    axis = 1 if shape == "maps" else -1
    q = ASQQuantizer(4, signed=False, channels=channels, feature_axis=axis)
    x = (torch.rand(batch, channels, 3, 3) if shape == "maps" else torch.rand(batch, 5, channels)) * 2
    q.init_from(x)
    with torch.no_grad():
        torch.nn.init.normal_(q.adapter.fc1.weight, std=0.5)
        q.adapter.fc1.bias.fill_(0.2)
        torch.nn.init.normal_(q.adapter.fc2.weight, std=0.1)
    hidden = q.adapter.fc1.out_features
    assert (batch * hidden * channels > 2**23) == (channels == 512)  # which path, as fused_quant.cpp's kLoopMacs
    (out_f, gx_f, gp_f), (out_e, gx_e, gp_e) = _module_runs(q, x)
    assert torch.equal(out_f, out_e)
    torch.testing.assert_close(gx_f, gx_e, rtol=1e-5, atol=1e-6)
    for name in ASQ_PARAMS:
        assert bool(gp_e[name].ne(0).any()), name
        torch.testing.assert_close(gp_f[name], gp_e[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_kernels
@pytest.mark.parametrize("frozen", ["input", "step"])
@pytest.mark.parametrize("make", [
    lambda: UniformQuantizer(4, signed=True),
    lambda: UniformQuantizer(4, signed=True, channels=6),
    lambda: PowerGridQuantizer(4, "post", channels=6),
    lambda: PowerGridQuantizer(4, "pot", channels=6),
], ids=["lsq-tensor", "lsq-channel", "post", "pot"])
def test_fused_lsq_and_grid_backward_give_gradients_exactly_where_asked(make, frozen):
    torch.manual_seed(0)
    q = make()
    x = torch.randn(6, 5, 3, 3)
    q.init_from(x)
    for p in q.parameters():
        p.requires_grad_(frozen != "step")
    grads = []
    for use_kernels in (True, False):
        q.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(frozen != "input")
        with contextlib.nullcontext() if use_kernels else kernels.disabled():
            q(xi).backward(_upstream(x.shape))
        grads.append((xi.grad, [p.grad for p in q.parameters()]))
    (gx_f, gp_f), (gx_e, gp_e) = grads
    assert (gx_f is None) == (gx_e is None) == (frozen == "input")
    if gx_e is not None:
        assert torch.equal(gx_f, gx_e)
    for f, e in zip(gp_f, gp_e):
        assert (f is None) == (e is None) == (frozen == "step")
        if e is not None:
            torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-6)


class _CountingKernels:
    """The kernel module, counting the forward calls that reach it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def counted(*args):
            self.calls.append(name)
            return fn(*args)

        return counted


@needs_kernels
@pytest.mark.parametrize("make, shape, fused", [
    (lambda: UniformQuantizer(4, signed=True), (6, 5, 3, 3), True),  # per tensor, any shape
    (lambda: UniformQuantizer(4, signed=True), (7,), True),
    (lambda: UniformQuantizer(4, signed=True, channels=6), (6, 5, 3, 3), True),  # a step per row of dim 0
    (lambda: UniformQuantizer(4, signed=True, channels=6), (6, 4), True),
    (lambda: UniformQuantizer(4, signed=True, channels=6), (6,), True),
    (lambda: UniformQuantizer(4, signed=True, channels=5, channel_axis=1), (6, 5, 3, 3), False),  # not rows
    (lambda: UniformQuantizer(4, signed=True, channels=5, channel_axis=1), (5, 5, 3, 3), False),  # even when N == C
    (lambda: PowerGridQuantizer(4, "post", channels=6), (6, 5, 3, 3), True),
    (lambda: ASQQuantizer(4, signed=False, channels=5), (6, 5, 3, 3), True),  # a step per sample
    (lambda: ASQQuantizer(4, signed=False, channels=5), (6, 5, 7), True),
    (lambda: ASQQuantizer(4, signed=False, channels=5), (6, 5), True),
    (lambda: ASQQuantizer(4, signed=False, channels=5).double(), (6, 5, 3, 3), False),  # float32 only
], ids=["tensor-4d", "tensor-1d", "channel-4d", "channel-2d", "channel-1d", "channel-axis-1", "channel-axis-1-square", "post",
        "asq-4d", "asq-3d", "asq-2d", "asq-float64"])
def test_quantizers_take_the_fused_path_wherever_it_applies(monkeypatch, make, shape, fused):
    """The kernels are a speed contract: each layout they support must reach them (same results either way)."""
    counting = _CountingKernels(kernels.fused())
    monkeypatch.setitem(kernels._state, "module", counting)
    torch.manual_seed(0)
    q = make()
    x = torch.randn(shape, dtype=next(q.parameters()).dtype)
    x = x.abs() if isinstance(q, ASQQuantizer) else x
    q.init_from(x)
    with torch.no_grad():
        fused_out = q(x)
    assert bool(counting.calls) is fused, counting.calls
    with kernels.disabled():
        assert torch.equal(q(x).detach(), fused_out)


@needs_kernels
@pytest.mark.parametrize("grid", sorted(GRID_BASES))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_power_grid_step_search_on_the_kernel_equals_the_eager_search(grid, bits):
    """init_mse runs its candidates through the fused forward where it is built: same alpha bit for bit."""
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    fused, eager = PowerGridQuantizer(bits, grid, 16), PowerGridQuantizer(bits, grid, 16)
    fused.init_mse(w)
    with kernels.disabled():
        eager.init_mse(w)
    assert torch.equal(fused.alpha, eager.alpha)


def test_a_compile_time_search_does_not_start_a_kernel_build(monkeypatch, tmp_path):
    """usable(build=False) answers None where the kernels are neither loaded nor in the cache."""
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_load", lambda: pytest.fail("a build was started"))
    assert not kernels.built()
    assert kernels.usable(torch.ones(2, 3), torch.ones(2, 1), build=False) is None


@needs_kernels
@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True), (4, False)])
def test_uniform_step_search_on_the_kernel_equals_the_eager_search(bits, signed):
    torch.manual_seed(bits)
    w = torch.randn(12, 5, 3, 3) * torch.rand(12, 1, 1, 1)
    fused, eager = UniformQuantizer(bits, signed, channels=12), UniformQuantizer(bits, signed, channels=12)
    fused.init_mse(w)
    with kernels.disabled():
        eager.init_mse(w)
    assert torch.equal(fused.step, eager.step)


@needs_kernels
def test_the_batch_norm_form_is_the_one_that_gives_atens_bits():
    form = kernels.batch_norm_form()
    assert form is not None  # AVX2/AVX-512 builds fuse, the baseline build does not: either way one matches
    x = torch.randn(8, 6, 13, 13) * 4 - 1
    w, b = torch.randn(6), torch.randn(6)
    out, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
    assert torch.equal(kernels.fused().batch_norm_output(x, mean, invstd, w, b, form), out)
    # the other form differs somewhere on this many values: the probe's choice is not vacuous
    assert not torch.equal(kernels.fused().batch_norm_output(x, mean, invstd, w, b, not form), out)


def test_no_batch_norm_form_when_neither_reproduces_aten():
    class Off:  # a kernel whose output is one ulp off everywhere
        @staticmethod
        def batch_norm_output(x, mean, invstd, w, b, fused):
            out = torch.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)[0]
            return torch.nextafter(out, torch.full_like(out, math.inf))

    assert kernels._probe_batch_norm_form(Off()) is None
