"""Calls whose ``training`` flag fx fixed at trace time: dropouts follow ``.train()`` / ``.eval()`` again."""

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler import training_calls
from qcompiler.training_calls import TrainingFlagWarning, TrainingOnlyCall, restore_training_flags


class FunctionalDropouts(nn.Module):
    """Dropout written the transformers way: ``F.dropout(x, p, training=self.training)``."""

    def __init__(self, features: int = 4 * 8 * 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(features, 10)

    def forward(self, x):
        x = F.dropout2d(torch.relu(self.bn(self.conv(x))), 0.5, self.training)
        return self.fc(F.dropout(x.flatten(1), p=0.25, training=self.training))


def drop_path(x, p: float, training: bool = True):
    """A drop-path function (timm's, torchvision's stochastic_depth) that a model calls with its mode."""
    if not training or p == 0:
        return x
    keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= p).to(x.dtype)
    return x * keep / (1 - p)


fx.wrap("drop_path")  # an fx leaf, as torchvision wraps stochastic_depth: its call is one node


class DropPathBlock(nn.Module):
    """A residual block whose branch goes through drop path, called with ``self.training``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # momentum 0: training steps leave the running statistics, so eval outputs stay comparable
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.0)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + drop_path(self.conv2(x), 0.5, self.training)
        return self.fc(x.flatten(1))


@pytest.fixture
def known_drop_path(monkeypatch):
    monkeypatch.setattr(training_calls, "EVAL_IDENTITIES", {f"{drop_path.__module__}.drop_path"})


def _calib():
    torch.manual_seed(1)
    return torch.rand(16, 1, 8, 8)


def test_dropout_calls_become_modules_that_follow_the_mode():
    model = FunctionalDropouts()
    before = copy.deepcopy(model.state_dict())
    c = qcompiler.compile(model, qcompiler.QuantSpec(passes="lsq"), calib_data=_calib())
    modules = {n.name: c.module.get_submodule(n.target) for n in c.module.graph.nodes if n.op == "call_module"}
    assert isinstance(modules["dropout2d"], nn.Dropout2d) and modules["dropout2d"].p == 0.5
    assert isinstance(modules["dropout"], nn.Dropout) and modules["dropout"].p == 0.25
    assert not any("dropout" in str(n.target) for n in c.module.graph.nodes if n.op == "call_function")
    x = _calib()[:4]
    c.module.train()
    assert not torch.equal(c.module(x), c.module(x))  # QAT trains with the model's dropout
    c.module.eval()
    with torch.no_grad():
        assert torch.equal(c.module(x), c.module(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched


@pytest.mark.parametrize("fn, cls", [(F.alpha_dropout, nn.AlphaDropout), (F.dropout3d, nn.Dropout3d),
                                     (F.feature_alpha_dropout, nn.FeatureAlphaDropout), (F.dropout1d, nn.Dropout1d)])
def test_every_dropout_function_gets_its_module(fn, cls):
    class Net(nn.Module):
        def forward(self, x):
            return fn(x, 0.1, self.training)

    gm = fx.symbolic_trace(Net().eval())
    assert restore_training_flags(gm) == [fn.__name__]
    assert type(gm.get_submodule(fn.__name__)) is cls


def test_calls_that_do_not_read_the_mode_are_kept():
    class Net(nn.Module):
        def forward(self, x):
            return F.dropout(F.dropout(x, 0.0, False), 0.3) + F.dropout(x, 0.2, True)  # p = 0; always on (twice)

    gm = fx.symbolic_trace(Net().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert restore_training_flags(gm) == []
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(F.dropout) == 3


def test_other_calls_with_a_fixed_flag_are_named_in_a_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            return F.batch_norm(x, self.mean, self.var, training=self.training)

    gm = fx.symbolic_trace(Net().eval())
    with pytest.warns(TrainingFlagWarning, match=r"batch_norm \(batch_norm\): traced with training=False"):
        restore_training_flags(gm)


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_backends_read_the_dropouts_as_identities(fmt):
    from runtime.test_coverage import agrees_in

    agrees_in(fmt, FunctionalDropouts())


def test_drop_path_calls_become_modules_that_follow_the_mode(known_drop_path):
    gm = fx.symbolic_trace(DropPathBlock().eval())
    assert restore_training_flags(gm) == ["drop_path"]
    module = gm.get_submodule("drop_path")
    assert isinstance(module, TrainingOnlyCall) and module.arguments == {"p": 0.5}
    x = torch.rand(16, 1, 8, 8)
    gm.train()
    assert not torch.equal(gm(x), gm(x))
    gm.eval()
    assert torch.equal(gm(x), DropPathBlock().eval()(x))


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_backends_read_drop_path_as_the_identity(known_drop_path, fmt):
    from runtime.test_coverage import agrees_in

    agrees_in(fmt, DropPathBlock())


class ComputedRateDropPath(DropPathBlock):
    """Drop path whose rate is computed in forward (from the input's shape): the call stays a function."""

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + drop_path(self.conv2(x), x.size(1) / 8, self.training)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("fmt", ["program", "custom"])
def test_backends_read_a_drop_path_function_call_as_the_identity(known_drop_path, fmt):
    from runtime.test_coverage import agrees_in

    with pytest.warns(TrainingFlagWarning, match="drop_path"):  # left a function: QAT runs it as in eval
        agrees_in(fmt, ComputedRateDropPath())


def test_an_unknown_function_with_a_fixed_flag_is_named(monkeypatch):
    monkeypatch.setattr(training_calls, "EVAL_IDENTITIES", set())
    gm = fx.symbolic_trace(DropPathBlock().eval())
    with pytest.warns(TrainingFlagWarning, match="drop_path"):
        assert restore_training_flags(gm) == []
