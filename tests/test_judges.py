"""The shipped reference judges (tiny_data/judge_*.pt) and tools/make_judge.py that makes them.

The full test accuracies are measured by `python tools/make_judge.py` and stated in
tiny_data/README.md; here: the files load with weights_only=True, the MNIST judge still classifies
the tiny subset's test digits, the CIFAR-10 judge maps 32x32 RGB images to 10-way probabilities,
and the command writes a loadable judge (on a small synthetic .npz, one epoch).
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

import minicca

sys.path.insert(0, os.path.join(os.path.dirname(minicca.__file__), "tools"))
import make_judge  # noqa: E402


@pytest.mark.parametrize("name, shape, classes", [("mnist", [28, 28, 1], 10),
                                                   ("cifar10", [32, 32, 3], 10)])
def test_shipped_judge_loads_with_weights_only(name, shape, classes):
    ckpt = torch.load(minicca.JUDGES[name], map_location="cpu", weights_only=True)
    assert ckpt["info"]["image_shape"] == shape
    assert set(ckpt) == {"model", "judge_config", "info"}  # "config" is a stage's cache key only
    judge = minicca.load_judge(name)
    assert not judge.training
    assert all(p.dtype == torch.float32 for p in judge.parameters())
    assert len(judge.info["classes"]) == classes
    assert judge.info["command"].startswith("python minicca.py judge --dataset ")


def test_mnist_judge_on_the_tiny_subset():
    data = minicca.load_dataset(None)
    features, probs = minicca.classify(minicca.load_judge("mnist"), data["x_test"], "cpu")
    assert features.shape == (len(data["x_test"]), 128)
    accuracy = probs.argmax(1).eq(torch.from_numpy(data["y_test"])).float().mean().item()
    assert accuracy >= 0.99, accuracy


def test_cifar10_judge_gives_10_way_probabilities():
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    features, probs = minicca.classify(minicca.load_judge("cifar10"), images, "cpu")
    assert features.shape == (6, 128)
    assert probs.shape == (6, 10)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(6), atol=1e-5)


def test_judge_command_writes_a_loadable_judge(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "blobs.npz"
    images = rng.integers(0, 256, (94, 16, 16, 3), dtype=np.uint8)
    np.savez(npz, x_train=images[:64], y_train=np.arange(64) % 3, x_test=images[64:],
             y_test=np.arange(30) % 3, classes=np.array(["a", "b", "c"]))
    out = tmp_path / "judge.pt"
    make_judge.main(["--dataset", str(npz), "--judge-epochs", "1", "--out", str(out)])
    judge = minicca.load_judge(str(out))
    assert judge.info["classes"] == ["a", "b", "c"]
    assert judge.info["image_shape"] == [16, 16, 3]
    assert 0 <= judge.info["test_accuracy"] <= 1
    assert "--judge-epochs 1" in judge.info["command"]
    probs = minicca.classify(judge, torch.rand(4, 3, 16, 16), "cpu")[1]
    assert probs.shape == (4, 3)
    assert "[judge] test accuracy" in capsys.readouterr().out


def test_judge_train_on_an_npz_uses_the_one_judge_network(tmp_path, capsys):
    """--judge train on an .npz (no shipped judge fits it) trains a JudgeNet with JUDGE_RECIPE through
    train_loop: classifier.pt holds a JudgeNet of the preset's width, one log per step, and the settings
    it was made with; the table names it."""
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = rng.integers(0, 40, (300, 16, 16, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 4:8, 4 * c:4 * c + 4] = 230  # a bright square whose place is the class
    npz = tmp_path / "squares.npz"
    np.savez(npz, x_train=x[:256], y_train=y[:256], x_test=x[256:], y_test=y[256:])
    out = tmp_path / "run"
    minicca.main(["--preset", "micro", "--dataset", str(npz), "--judge", "train", "--no-cca",
                  "--eval-seeds", "1", "--judge-epochs", "4", "--out", str(out)])
    ckpt = torch.load(out / "classifier.pt", weights_only=True)
    width = minicca.PRESETS["micro"]["judge_width"]
    judge = minicca.JudgeNet(3, 3, width)
    judge.load_state_dict(ckpt["model"])  # strict: exactly JudgeNet's weights
    assert ckpt["config"]["judge_width"] == width and ckpt["config"]["judge_epochs"] == 4
    batch = min(minicca.JUDGE_RECIPE["batch"], 256)
    assert len(ckpt["history"]) == round(4 * (256 // batch))
    assert 0 <= ckpt["test_accuracy"] <= 1
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["judge"] == "trained here (classifier.pt)"
    assert metrics["classifier_accuracy"] == ckpt["test_accuracy"]
    assert "[classifier] test accuracy" in capsys.readouterr().out
