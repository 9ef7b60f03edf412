"""The ``smooth`` pass (SmoothQuant): a layer norm's outlier features move into the linear layers reading it."""

import warnings

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import ir
from qcompiler.passes import PassContext
from qcompiler.passes.smooth import ALPHAS, Smooth, simulated_error, smoothing_scales


class PreNorm(nn.Module):
    """A pre-norm MLP block on tokens whose norm has two outlier features (large affine weight, bias)."""

    def __init__(self, post_norm: bool = False, shared: bool = False) -> None:
        super().__init__()
        self.post_norm, self.shared = post_norm, shared
        self.norm, self.fc1, self.fc2, self.head = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)
        with torch.no_grad():
            self.norm.weight[3] = 200.0
            self.norm.bias[5] = 20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1)[:, :48].reshape(-1, 3, 16)  # (batch, 3 tokens, 16 features)
        h = self.norm(t)
        if self.post_norm:  # the norm's output is also the residual stream: nothing to move it into
            t = h + self.fc2(torch.relu(self.fc1(h)))
        else:
            t = t + self.fc2(torch.relu(self.fc1(h)))
        if self.shared:  # fc1 called at a second site, on a tensor the norm did not make
            t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.mean(1))


def _compile(model, passes, **spec):
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # passes="smooth" alone quantizes nothing
        return qcompiler.compile(model, qcompiler.QuantSpec(passes=passes, pin_first_last=False, **spec), calib_data=x), x


def _smoothed(c) -> dict[str, ir.Smoothing]:
    return {n.name: n.meta[ir.SMOOTH] for n in c.module.graph.nodes if ir.SMOOTH in n.meta}


def test_float_function_is_unchanged_and_the_outliers_shrink():
    torch.manual_seed(0)
    model = PreNorm().eval()
    c, x = _compile(model, "smooth")
    (name, rec), = _smoothed(c).items()
    assert (name, rec.readers, rec.batches) == ("norm", ("fc1",), 2) and rec.alpha in ALPHAS and rec.spread > 5
    with torch.no_grad():
        torch.testing.assert_close(c.module(x), model(x), rtol=1e-5, atol=1e-5)
        before = model.norm(x.flatten(1)[:, :48].reshape(-1, 3, 16)).abs().amax((0, 1))
        after = c.module.get_submodule("norm")(x.flatten(1)[:, :48].reshape(-1, 3, 16)).abs().amax((0, 1))
    assert float(before.max() / before.median()) > 5 * float(after.max() / after.median())
    assert model.norm.weight[3] == 200.0  # the user's model is untouched


def test_smoothing_lowers_the_8bit_error_of_the_layers_reading_the_norm():
    torch.manual_seed(0)
    model = PreNorm().eval()
    outputs = {}

    def fc1_output(module):
        seen = []
        module.get_submodule("fc1").register_forward_hook(lambda m, i, out: seen.append(out.detach()))
        with torch.no_grad():
            module(x)
        return seen[0]

    for passes in ("lsq", "smooth,lsq"):
        c, x = _compile(model, passes, weight_bits=8, act_bits=8)
        outputs[passes] = fc1_output(c.module)
    want = fc1_output(model)
    errors = {p: float((y - want).norm() / want.norm()) for p, y in outputs.items()}
    assert errors["smooth,lsq"] < 0.5 * errors["lsq"], errors


@pytest.mark.parametrize("kind", ["post_norm", "shared"])
def test_a_norm_it_cannot_move_is_left_alone(kind):
    torch.manual_seed(0)
    model = PreNorm(**{kind: True}).eval()
    c, x = _compile(model, "smooth")
    assert _smoothed(c) == {}
    assert torch.equal(c.module.get_submodule("norm").weight, model.norm.weight)


def test_attention_projections_are_the_readers_and_a_second_run_changes_nothing():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.attn, self.head = nn.LayerNorm(16), nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 10)
            with torch.no_grad():
                self.norm.weight[0] = 40.0

        def forward(self, x):
            t = x.flatten(1)[:, :48].reshape(-1, 3, 16)
            h = self.norm(t)
            return self.head((t + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    model = Attn().eval()
    c, x = _compile(model, "smooth")
    rec = _smoothed(c)["norm"]
    assert sorted(rec.readers) == ["attn_k_proj", "attn_q_proj", "attn_v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(c.module(x), model(x), rtol=1e-5, atol=1e-5)
    again = Smooth().run(c.module, PassContext(spec=qcompiler.QuantSpec(), example_inputs=(x[:1],), calib_batches=[x]))
    assert not again.modified


def test_scales_leave_dead_features_alone():
    s = smoothing_scales(torch.tensor([9.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    assert s.tolist() == [3.0, 1.0, 1.0]


def test_the_chosen_alpha_simulates_best_and_none_is_an_option():
    """alpha is chosen on the calibration samples: the least simulated error of the readers'
    outputs at the spec's widths, against every other strength and against not smoothing."""
    torch.manual_seed(0)
    model = PreNorm().eval()
    c, x = _compile(model, "smooth", weight_bits=8, act_bits=8)
    chosen = _smoothed(c)["norm"].alpha
    with torch.no_grad():
        h = model.norm(x.flatten(1)[:, :48].reshape(-1, 3, 16)).reshape(-1, 16).double()
    w = model.fc1.weight.detach().double()
    a_max, w_max = h.abs().amax(0), w.abs().amax(0)

    def error(alpha):
        sc = torch.ones(16, dtype=torch.float64) if alpha is None else smoothing_scales(a_max, w_max, alpha)
        return simulated_error(h / sc, [w * sc], 8, 8)

    assert error(chosen) == min(error(a) for a in (None, *ALPHAS))
    assert error(chosen) < 0.5 * error(None)
