"""Benchmark helpers (bench/data.py, bench/baseline.py): metrics, bootstrap CIs, natural-image views."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from bench.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    accuracy,
    cache_dir,
    load_digits_test,
    load_mnist1d_test,
    natural_image_views,
    paired_bootstrap_ci,
    top1_agreement,
)
from red_onnx.errors import InputError

HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
HAS_ONNXSIM = importlib.util.find_spec("onnxsim") is not None


def one_hot_logits(classes: list[int], n_classes: int = 4) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[classes]


def test_top1_agreement_counts_matching_argmax() -> None:
    a = one_hot_logits([0, 1, 2, 3])
    b = one_hot_logits([0, 1, 3, 3]) * 5.0  # scale does not change the arg-max
    assert top1_agreement(a, b) == 0.75
    assert top1_agreement(a, a) == 1.0


def test_top1_agreement_rejects_unpaired_rows() -> None:
    with pytest.raises(InputError, match="3 rows"):
        top1_agreement(one_hot_logits([0, 1, 2]), one_hot_logits([0, 1]))


def test_accuracy() -> None:
    logits = one_hot_logits([0, 1, 2, 3, 0])
    assert accuracy(logits, np.array([0, 1, 2, 0, 1])) == 0.6
    with pytest.raises(InputError, match="labels"):
        accuracy(logits, np.array([0, 1]))


def test_bootstrap_ci_identical_vectors_is_zero_width() -> None:
    correct = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    assert tuple(paired_bootstrap_ci(correct, correct)) == (0.0, 0.0, 0.0)


def test_bootstrap_ci_contains_true_difference_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.9  # true accuracy 0.9
    b = rng.random(2000) < 0.8  # true accuracy 0.8: true difference 0.1
    interval = paired_bootstrap_ci(a, b)
    assert interval.low < 0.1 < interval.high
    assert interval.low <= interval.estimate <= interval.high
    assert interval.estimate == pytest.approx(a.mean() - b.mean())
    assert paired_bootstrap_ci(a, b) == interval


def test_bootstrap_ci_matches_resampling_pairs() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(500) < 0.7, rng.random(500) < 0.6
    diff = a.astype(float) - b.astype(float)
    naive = diff[rng.integers(0, 500, (4000, 500))].mean(axis=1)
    low, high = np.quantile(naive, [0.025, 0.975])
    interval = paired_bootstrap_ci(a, b, n_boot=4000)
    assert interval.low == pytest.approx(low, abs=0.01)
    assert interval.high == pytest.approx(high, abs=0.01)


def test_bootstrap_ci_covers_about_95_percent() -> None:
    rng = np.random.default_rng(3)
    trials, n = 200, 300
    covered = 0
    for trial in range(trials):
        a, b = rng.random(n) < 0.85, rng.random(n) < 0.75  # true difference 0.1
        interval = paired_bootstrap_ci(a, b, n_boot=1000, seed=trial)
        covered += interval.low <= 0.1 <= interval.high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_ci_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="equal-length"):
        paired_bootstrap_ci(np.ones(3), np.ones(4))
    with pytest.raises(InputError, match="0/1"):
        paired_bootstrap_ci(np.array([0, 2]), np.array([0, 1]))


def test_load_digits_test() -> None:
    images, labels = load_digits_test()
    assert images.shape == (360, 1, 8, 8) and images.dtype == np.float32
    assert labels.shape == (360,) and labels.dtype == np.int64


def test_load_mnist1d_test_missing_cache_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RED_ONNX_BENCH", str(tmp_path))
    with pytest.raises(InputError, match=r"train_mnist1d\.py"):
        load_mnist1d_test()


@pytest.mark.skipif(
    not (cache_dir() / "mnist1d_test.npz").is_file(),
    reason="no MNIST-1D split in the bench cache: run `python bench/models/train_mnist1d.py`",
)
def test_load_mnist1d_test() -> None:
    signals, labels = load_mnist1d_test()
    assert signals.shape == (1000, 1, 40) and signals.dtype == np.float32
    assert labels.shape == (1000,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


@pytest.fixture(scope="module")
def views() -> np.ndarray:
    if not HAS_SKIMAGE:
        pytest.skip("scikit-image is not installed: `pip install scikit-image`")
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    return natural_image_views(n_min=100)


def test_natural_image_views_shape_and_values(views: np.ndarray) -> None:
    assert views.ndim == 4 and views.shape[0] >= 100 and views.shape[1:] == (3, 224, 224)
    assert views.dtype == np.float32 and np.isfinite(views).all()
    pixels = views * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]  # undo normalisation
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    flat = views.reshape(len(views), -1)
    assert len(np.unique(flat[:, ::997], axis=0)) == len(views)  # every view differs


def test_natural_image_views_are_deterministic(views: np.ndarray) -> None:
    again = natural_image_views(n_min=100)
    np.testing.assert_array_equal(again, views)


@pytest.mark.skipif(not HAS_ONNXSIM, reason="onnxsim is not installed: `pip install onnxsim==0.8.1`")
def test_prune_to_macs_on_demo_model() -> None:
    from bench.baseline import macs, prune_to_macs
    from red_onnx.demo import demo_path

    pruned, sparsity, fraction = prune_to_macs(demo_path(), 0.99)  # only its Gemm head is prunable
    assert abs(fraction - 0.99) <= 0.01 and 0.0 <= sparsity < 1.0
    assert macs(pruned) < macs(onnx.load(str(demo_path())))
    with pytest.raises(InputError, match="closest"):
        prune_to_macs(demo_path(), 0.5)


# ------------------------------------------------------------------------------------------------
# The builders of the models the method was not tuned on (bench/models/, options only: no training)
# ------------------------------------------------------------------------------------------------

BENCH_MODELS = Path(__file__).resolve().parents[1] / "bench" / "models"


def _bench_model_script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH_MODELS))  # the scripts import their neighbour `export`
    return importlib.import_module(name)


def test_mnist1d_options_keep_the_default_model_and_build_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch", reason="torch is a dev-only dependency")
    script = _bench_model_script("train_mnist1d", monkeypatch)
    default = script.parse_args([])
    assert (default.seed, default.channels, default.kernel, default.name) == (0, [32, 64, 64], 5, "mnist1d")
    assert script.variant_label(default) == ""  # the default doc string, so the same bytes
    argv = ["--seed", "1", "--channels", "24", "48", "64", "96", "--kernel", "3", "--name", "mnist1d_b"]
    variant = script.parse_args(argv)
    assert "seed 1" in script.variant_label(variant)
    for options, widths, kernel in ((default, [32, 64, 64], 5), (variant, [24, 48, 64, 96], 3)):
        model = script.build_model(options).eval()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
        assert [c.out_channels for c in convs] == widths and {c.kernel_size for c in convs} == {(kernel,)}
        assert model(torch.zeros(2, 1, 40)).shape == (2, 10)
    with pytest.raises(SystemExit):
        script.parse_args(["--kernel", "4"])


def test_digits_variant_options_build_wider_deeper_nets(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch", reason="torch is a dev-only dependency")
    script = _bench_model_script("train_digits_variant", monkeypatch)
    for argv, blocks, residual in (([], 2, True), (["--blocks", "3", "--plain"], 3, False)):
        model = script.build_model(script.parse_args(argv)).eval()
        assert len(model.blocks) == blocks
        assert all(isinstance(b, script.ResidualBlock) == residual for b in model.blocks)
        assert model.stem[0].out_channels == 48 and model.down[0].out_channels == 96
        assert len([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == 2 + 2 * blocks
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_ppocr_cls_fixed_shape_computes_what_the_zoo_model_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.zoo import zoo_dir

    source = zoo_dir() / "ppocr_mobile_cls.onnx"
    if not source.is_file():
        pytest.skip(f"{source} is absent: run `python bench/zoo.py`")
    import onnxruntime as ort

    model = _bench_model_script("export_ppocr_cls", monkeypatch).fixed_shape_model(source)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 48, 192]
    x = np.random.default_rng(0).uniform(-1.0, 1.0, (3, 3, 48, 192)).astype(np.float32)
    fixed, zoo = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                  for m in (model.SerializeToString(), str(source)))  # fmt: skip
    np.testing.assert_allclose(fixed, zoo, rtol=0, atol=1e-5)
