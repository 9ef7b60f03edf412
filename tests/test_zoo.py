"""Tests for qcompiler.zoo: every model builds, runs, traces to the same numbers."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import pytest
import torch
from torch import fx, nn

from qcompiler import zoo
from qcompiler.errors import SpecError
from small_models import SMALL_KWARGS as SMALL_SIZES

IMAGE_MODELS = ["resnet20", "resnet18", "resnet50", "mobilenetv2", "plain_cnn", "adder_resnet20"]
SMALL_KWARGS = {**SMALL_SIZES, "adder_resnet20": {"width": 4}}  # the adder layers are the slow ones here
INPUT_SHAPES = [(1, 8, 8), (3, 32, 32)]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """These tensors are tiny; on a busy machine a second intra-op thread only adds contention (7 s vs 40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_eager_and_traced(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Eager output has shape (B, num_classes) and the fx-traced module reproduces it."""
    model.eval()
    with torch.no_grad():
        eager = model(x)
        traced = fx.symbolic_trace(model)
        traced_out = traced(x)
    assert eager.shape == (x.shape[0], num_classes)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(traced_out, eager)


def test_registry_lists_all_models() -> None:
    assert set(zoo.ZOO) == {"resnet20", "resnet18", "resnet50", "mobilenetv2", "plain_cnn", "conv1d_net", "adder_resnet20"}


@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_runs_and_traces(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = zoo.build(name, in_channels=shape[0], num_classes=7, **SMALL_KWARGS[name])
    _check_eager_and_traced(model, torch.randn(2, *shape), num_classes=7)


def test_conv1d_net_runs_and_traces() -> None:
    torch.manual_seed(0)
    model = zoo.build("conv1d_net", in_channels=1, num_classes=10)
    _check_eager_and_traced(model, torch.randn(2, 1, 64), num_classes=10)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv1d) and m.groups > 1]
    assert len(grouped) == 1


def test_models_at_default_width_run_on_digits() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    for name in ["resnet20", "resnet18", "mobilenetv2", "plain_cnn"]:
        model = zoo.build(name, in_channels=1, num_classes=10).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 10), name


def test_resnet50_at_default_width_on_64x64() -> None:
    model = zoo.resnet50(in_channels=3, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert model.fc.in_features == 2048


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_starts_every_block_as_its_shortcut(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(zoo, name)(in_channels=1, num_classes=10, width=4, zero_init_residual=True).eval()
    last = [b.bn3 if isinstance(b, zoo.Bottleneck) else b.bn2 for b in model.stages]
    assert last and all(bool((bn.weight == 0).all()) for bn in last)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for b in model.stages:  # bias 0 and gain 0: the branch adds nothing
            h = model.stem(x) if b is model.stages[0] else h
            assert torch.equal(b(h), torch.relu(b.shortcut(h) + 0.0)), name
            h = b(h)
    default = getattr(zoo, name)(in_channels=1, num_classes=10, width=4)
    assert all(bool((bn.weight == 1).all()) for bn in (m.bn2 if isinstance(m, zoo.BasicBlock) else m.bn3 for m in default.stages))


def test_models_train_mode_backward() -> None:
    """Batch norm in training mode and autograd work through every model."""
    torch.manual_seed(0)
    for name in IMAGE_MODELS:
        model = zoo.build(name, in_channels=1, num_classes=10, **SMALL_KWARGS[name]).train()
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        assert all(p.grad is not None for p in model.parameters()), name


class CountingConv(nn.Conv2d):
    """A distinguishable conv class, standing in for e.g. an adder layer."""


def test_resnet20_conv_factory_used_only_for_block_convs() -> None:
    model = zoo.resnet20(in_channels=3, num_classes=10, conv=CountingConv)
    custom = [m for m in model.modules() if type(m) is CountingConv]
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert len(custom) == 18
    assert all(m.kernel_size == (3, 3) for m in custom)
    # The stem and the two 1x1 projection shortcuts stay nn.Conv2d.
    assert len(plain) == 3
    assert sorted(m.kernel_size for m in plain) == [(1, 1), (1, 1), (3, 3)]
    assert type(model.fc) is nn.Linear
    _check_eager_and_traced(model, torch.randn(2, 3, 32, 32), num_classes=10)


def test_resnet20_conv_factory_receives_documented_arguments() -> None:
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def factory(*args: object, **kwargs: object) -> nn.Module:
        calls.append((args, kwargs))
        return nn.Conv2d(*args, **kwargs)  # type: ignore[arg-type]

    zoo.resnet20(in_channels=1, width=4, conv=factory)
    assert len(calls) == 18
    for args, kwargs in calls:
        assert len(args) == 2
        assert kwargs["kernel_size"] == 3 and kwargs["padding"] == 1 and kwargs["bias"] is False
    assert sorted(kwargs["stride"] for _, kwargs in calls) == [1] * 16 + [2, 2]


def test_resnet20_parameter_count() -> None:
    model = zoo.resnet20(in_channels=3, num_classes=10, width=16)
    count = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < count < 0.28e6


def test_no_module_is_called_twice() -> None:
    """Each conv module appears at exactly one call site of the traced graph."""
    for name in zoo.ZOO:
        model = zoo.build(name, **SMALL_KWARGS[name])
        graph = fx.symbolic_trace(model).graph
        targets = [node.target for node in graph.nodes if node.op == "call_module"]
        assert len(targets) == len(set(targets)), name


def test_graph_exercises_add_and_cat() -> None:
    def call_functions(model: nn.Module) -> set[object]:
        return {n.target for n in fx.symbolic_trace(model).graph.nodes if n.op == "call_function"}

    assert torch.cat in call_functions(zoo.plain_cnn())
    assert operator.add in call_functions(zoo.resnet20())
    assert operator.add in call_functions(zoo.mobilenetv2())
    depthwise = [m for m in zoo.mobilenetv2().modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert depthwise


def test_weight_init() -> None:
    model = zoo.resnet20()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_build_unknown_name_raises_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        zoo.build("vgg16")
    message = str(info.value)
    assert "\n" not in message
    assert "vgg16" in message and "resnet20" in message and "conv1d_net" in message


def test_build_bad_keyword_raises_spec_error() -> None:
    with pytest.raises(SpecError, match="width_mult"):
        zoo.build("mobilenetv2", width=8)


def test_conv1d_net_width_must_fit_groups() -> None:
    with pytest.raises(SpecError):
        zoo.conv1d_net(width=6)
