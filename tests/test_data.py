"""Tests for qcompiler.data: the digits split and validation of user .npz files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompiler.data import Dataset, load_data, load_digits, load_digits_hard, load_npz
from qcompiler.errors import DataError


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_dtypes() -> None:
    data = load_digits()
    assert data.x_train.shape == (1347, 1, 8, 8)
    assert data.x_test.shape == (450, 1, 8, 8)
    assert data.y_train.shape == (1347,) and data.y_test.shape == (450,)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.input_shape == (1, 8, 8)
    assert data.num_classes == 10


def test_digits_split_is_stratified() -> None:
    data = load_digits()
    test_counts = torch.bincount(data.y_test, minlength=10).double()
    all_counts = test_counts + torch.bincount(data.y_train, minlength=10).double()
    assert torch.all((test_counts - 0.25 * all_counts).abs() <= 1.0)


def test_digits_split_is_deterministic() -> None:
    first = load_digits()
    load_digits.cache_clear()
    second = load_digits()
    assert first is not second
    torch.testing.assert_close(first.x_train, second.x_train)
    torch.testing.assert_close(first.y_test, second.y_test)


def test_digits_is_cached() -> None:
    assert load_digits() is load_digits()


def test_digits_train_is_standardised() -> None:
    data = load_digits()
    assert abs(data.x_train.mean().item()) < 1e-4
    assert abs(data.x_train.std().item() - 1.0) < 1e-3
    # The test split uses the train statistics, so it is close but not exact.
    assert abs(data.x_test.mean().item()) < 0.1


def test_load_data_digits() -> None:
    assert load_data("digits") is load_digits()


# --------------------------------------------------------------------------- loader


def test_digits_hard_is_a_deterministic_harder_digits() -> None:
    hard = load_data("digits-hard")
    assert hard is load_digits_hard()  # cached
    again = load_digits_hard.__wrapped__()  # generated anew: the same bits
    assert torch.equal(hard.x_train, again.x_train) and torch.equal(hard.x_test, again.x_test)
    assert hard.input_shape == (1, 16, 16) and hard.x_train.dtype == torch.float32
    plain = load_digits()
    # the same stratified split of the same source digits, so the labels match one to one
    assert torch.equal(hard.y_train, plain.y_train) and torch.equal(hard.y_test, plain.y_test)
    assert abs(float(hard.x_train.mean())) < 1e-4 and abs(float(hard.x_train.std()) - 1) < 1e-3
    # warped and noised: a plain 2x upsampling of each digit explains little of the image
    up = torch.nn.functional.interpolate(plain.x_train, scale_factor=2, mode="bilinear")
    corr = torch.nn.functional.cosine_similarity(up.flatten(1), hard.x_train.flatten(1)).mean()
    assert 0.1 < float(corr) < 0.8, float(corr)


def _npz(tmp_path: Path, shape: tuple[int, ...]) -> Dataset:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, *shape)).astype(np.float32), y=np.arange(40) % 4)
    return load_npz(tmp_path / "d.npz")


def test_npz_shapes_follow_the_models_first_layer(tmp_path: Path) -> None:
    from qcompiler.data import fit_to_model
    from qcompiler.zoo import conv1d_net, plain_cnn, resnet20

    mlp = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert fit_to_model(_npz(tmp_path, (12,)), mlp).input_shape == (12,)  # (N, F) for an MLP
    assert fit_to_model(_npz(tmp_path, (3, 32)), conv1d_net(in_channels=3)).input_shape == (3, 32)  # (N, C, L) kept
    assert fit_to_model(_npz(tmp_path, (32,)), conv1d_net(in_channels=1)).input_shape == (1, 32)  # channel added
    assert fit_to_model(_npz(tmp_path, (8, 8)), plain_cnn()).input_shape == (1, 8, 8)  # grey images
    assert fit_to_model(_npz(tmp_path, (3, 8, 8)), resnet20(in_channels=3)).input_shape == (3, 8, 8)
    assert fit_to_model(load_digits(), conv1d_net()).input_shape == (1, 64)  # images to a 1-D model
    with pytest.raises(DataError, match=r"'features.0.0' \(Conv1d, 3 input channel\(s\)\) takes samples shaped \(C, L\) "
                                        r"with C = 3, but the data's samples are shaped \(8, 8\)"):
        fit_to_model(_npz(tmp_path, (8, 8)), conv1d_net(in_channels=3))
    with pytest.raises(DataError, match=r"save x as \(N, C, H, W\)"):
        fit_to_model(_npz(tmp_path, (2, 8, 8)), resnet20(in_channels=3))


def test_loader_batches_and_seeded_shuffle() -> None:
    data = load_digits()
    batches = list(data.loader("test", batch_size=100, shuffle=False, seed=0))
    assert [len(y) for _, y in batches] == [100, 100, 100, 100, 50]
    torch.testing.assert_close(batches[0][0], data.x_test[:100])

    def first_labels(seed: int) -> torch.Tensor:
        return next(iter(data.loader("train", batch_size=32, shuffle=True, seed=seed)))[1]

    torch.testing.assert_close(first_labels(3), first_labels(3))
    assert not torch.equal(first_labels(3), first_labels(4))


def test_loader_rejects_bad_split() -> None:
    with pytest.raises(DataError, match="train"):
        load_digits().loader("validation", batch_size=8)


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_with_explicit_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3, 5, 5)), rng.integers(0, 4, size=20)
    x_test, y_test = rng.normal(size=(6, 3, 5, 5)), np.array([0, 1, 2, 3, 4, 1])
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)

    data = load_data(str(path))
    assert isinstance(data, Dataset)
    np.testing.assert_allclose(data.x_train.numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(data.y_train.numpy(), y)
    np.testing.assert_allclose(data.x_test.numpy(), x_test.astype(np.float32))
    assert data.x_train.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert data.input_shape == (3, 5, 5)
    assert data.num_classes == 5


def test_npz_without_test_split_is_split_75_25(tmp_path: Path) -> None:
    x = np.arange(40 * 6 * 6, dtype=np.float64).reshape(40, 6, 6)
    y = np.repeat([0, 1], 20)
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)

    data = load_npz(path)
    assert data.x_train.shape == (30, 6, 6) and data.x_test.shape == (10, 6, 6)  # kept: the model decides
    assert torch.bincount(data.y_test).tolist() == [5, 5]
    # Not standardised: values are exactly the saved ones.
    assert sorted(torch.cat([data.x_train, data.x_test]).flatten().tolist()) == x.flatten().tolist()
    again = load_npz(path)
    torch.testing.assert_close(data.y_train, again.y_train)


def test_npz_tabular_and_float_labels(tmp_path: Path) -> None:
    path = tmp_path / "table.npz"
    np.savez(path, x=np.ones((8, 3), dtype=np.float32), y=np.array([0.0, 1.0] * 4))
    data = load_npz(path)
    assert data.input_shape == (3,)
    assert data.y_train.dtype == torch.int64


def test_npz_with_singleton_class_still_splits(tmp_path: Path) -> None:
    path = tmp_path / "rare.npz"
    np.savez(path, x=np.ones((9, 2)), y=np.array([0, 0, 0, 0, 1, 1, 1, 1, 2]))
    data = load_npz(path)
    assert len(data.y_train) + len(data.y_test) == 9


def _save(**arrays: np.ndarray) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / "bad.npz"
        np.savez(path, **arrays)
        return path

    return write


def _write_bytes(content: bytes, name: str = "bad.npz") -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content)
        return path

    return write


def _write_npy(directory: Path) -> Path:
    path = directory / "array.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(3))
    return path


X4 = np.zeros((4, 2, 2))
Y4 = np.array([0, 1, 0, 1])

BAD_NPZ_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing_file": (lambda d: d / "nope.npz", "does not exist"),
    "not_a_zip": (_write_bytes(b"this is not numpy data at all"), "not a valid .npz"),
    "empty_file": (_write_bytes(b""), "not a valid .npz"),
    "single_npy": (_write_npy, "single .npy array"),
    "missing_x": (_save(y=Y4), "'x'"),
    "missing_y": (_save(x=X4), "y"),
    "empty_x": (_save(x=np.zeros((0, 2, 2)), y=np.zeros(0, dtype=np.int64)), "0 samples"),
    "length_mismatch": (_save(x=X4, y=np.array([0, 1, 0])), "4 samples"),
    "float_labels": (_save(x=X4, y=np.array([0.0, 0.5, 1.0, 1.0])), "non-integer"),
    "string_labels": (_save(x=X4, y=np.array(["a", "b", "a", "b"])), "dtype"),
    "negative_labels": (_save(x=X4, y=np.array([0, -1, 0, 1])), "negative"),
    "one_hot_labels": (_save(x=X4, y=np.eye(4, dtype=np.int64)), "(N,)"),
    "one_dim_x": (_save(x=np.zeros(4), y=Y4), "at least one feature axis"),
    "nan_x": (_save(x=np.full((4, 2), np.nan), y=Y4), "NaN"),
    "object_x": (_save(x=np.array([[1], "a", None, 2.0], dtype=object), y=Y4), "not a valid .npz"),
    "x_test_without_y_test": (_save(x=X4, y=Y4, x_test=X4), "y_test"),
    "x_test_shape_mismatch": (_save(x=X4, y=Y4, x_test=np.zeros((2, 3, 3)), y_test=np.array([0, 1])), "matching"),
    "test_length_mismatch": (_save(x=X4, y=Y4, x_test=X4, y_test=np.array([0])), "y_test"),
    "single_sample_no_split": (_save(x=np.zeros((1, 2)), y=np.array([0])), "x_test"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ_CASES))
def test_bad_npz_raises_one_line_data_error(case: str, tmp_path: Path) -> None:
    make, fragment = BAD_NPZ_CASES[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_data(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message


def test_load_data_rejects_unknown_name() -> None:
    with pytest.raises(DataError) as info:
        load_data("cifar10")
    message = str(info.value)
    assert "digits" in message and ".npz" in message and "\n" not in message
