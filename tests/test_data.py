"""Data loading: torchvision's MNIST and CIFAR-10 without the network, the bring-your-own .npz path, and the
one-line errors for every kind of bad input.

MNIST is read by the real torchvision class from tiny IDX files that the tests write; CIFAR-10's class checks
the checksums of its files, so it is replaced by a stand-in with the same attributes (.data, .targets,
.classes). No test downloads anything: the one real subprocess points the proxies at a closed local port.
"""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import minicca

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "minicca.py")


# ----------------------------------------------------------------------------------------------------------
# helpers

def write_idx_images(path, x):
    """IDX3: magic 0x00000803 (uint8, 3 dims), then N, H, W as big-endian int32, then the pixels."""
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *x.shape))
        f.write(np.ascontiguousarray(x, dtype=np.uint8).tobytes())


def write_idx_labels(path, y):
    """IDX1: magic 0x00000801 (uint8, 1 dim), then N, then the labels."""
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 0x801, len(y)))
        f.write(np.asarray(y, dtype=np.uint8).tobytes())


def arrays(n_train=12, n_test=6, hw=8, channels=None, classes=4, seed=0):
    """A valid dict for validate_arrays: NHW (channels None) or NHWC uint8 images, labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    shape = (hw, hw) if channels is None else (hw, hw, channels)
    return {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
            "y_train": np.arange(n_train) % classes,
            "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
            "y_test": np.arange(n_test) % classes}


def save_npz(path, **a):
    np.savez(path, **a)
    return str(path)


def no_download(*args, **kwargs):
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3] offline>")


# ----------------------------------------------------------------------------------------------------------
# MNIST through the real torchvision class, from IDX files written here

def test_mnist_from_raw_idx_files_without_the_network(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)  # a download attempt fails loudly
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y_train = np.array([3, 1, 4, 0, 5, 9, 2, 6, 7, 3, 5, 8])  # every digit has a training image
    x_test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y_test = np.array([0, 7, 9, 9, 2])
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_images(raw / "train-images-idx3-ubyte", x_train)
    write_idx_labels(raw / "train-labels-idx1-ubyte", y_train)
    write_idx_images(raw / "t10k-images-idx3-ubyte", x_test)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", y_test)

    d = minicca.load_dataset("mnist", str(tmp_path))
    assert d["x_train"].shape == (12, 28, 28, 1) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (5, 28, 28, 1) and d["x_test"].dtype == np.uint8
    assert np.array_equal(d["x_train"][..., 0], x_train) and np.array_equal(d["x_test"][..., 0], x_test)
    assert d["y_train"].dtype == np.int64 and d["y_test"].dtype == np.int64
    assert d["y_train"].tolist() == y_train.tolist() and d["y_test"].tolist() == y_test.tolist()
    assert len(d["classes"]) == 10 and d["classes"][0].startswith("0") and d["classes"][9].startswith("9")
    assert all(isinstance(c, str) for c in d["classes"])
    assert sorted(os.listdir(raw)) == sorted(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 through a stand-in for torchvision's class (its checksums reject generated files)

class FakeCIFAR10:
    """What minicca uses of torchvision.datasets.CIFAR10: the constructor, .data, .targets, .classes."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    calls = []

    def __init__(self, root, train=True, download=False, **kwargs):
        FakeCIFAR10.calls.append((root, train, download))
        n = 20 if train else 10
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]


def test_cifar10_through_the_torchvision_class(tmp_path, monkeypatch):
    import torchvision
    FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    d = minicca.load_dataset("cifar10", str(tmp_path))
    assert d["x_train"].shape == (20, 32, 32, 3) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (10, 32, 32, 3) and d["x_test"].dtype == np.uint8
    assert d["y_train"].dtype == np.int64 and d["y_train"].tolist() == [i % 10 for i in range(20)]
    assert d["y_test"].tolist() == list(range(10))
    assert d["classes"] == FakeCIFAR10.classes
    # both splits, from --data-root, and no download when the files are there
    assert FakeCIFAR10.calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]


# ----------------------------------------------------------------------------------------------------------
# offline: an empty root and failing downloads give one clear UserError

def test_mnist_offline_with_an_empty_root_is_a_user_error(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    with pytest.raises(minicca.UserError) as e:
        minicca.load_dataset("mnist", str(tmp_path))
    msg = str(e.value)
    assert "MNIST" in msg and str(tmp_path) in msg
    assert "Place the files there" in msg and os.path.join(str(tmp_path), "MNIST", "raw") in msg
    assert ".npz" in msg and "\n" not in msg


class OfflineCIFAR10:
    """torchvision's behaviour offline: no files -> RuntimeError; download=True -> a URL error."""

    def __init__(self, root, train=True, download=False, **kwargs):
        if download:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")


def test_cifar10_offline_is_a_user_error_and_the_cli_prints_one_line(tmp_path, monkeypatch, capsys):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(minicca.UserError) as e:
        minicca.load_dataset("cifar10", str(tmp_path))
    assert "CIFAR10" in str(e.value) and "Place the files there" in str(e.value) and ".npz" in str(e.value)

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ex:
        minicca.main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(out),
                      "--preset", "micro", "--device", "cpu"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("minicca: error: CIFAR10 is not under --data-root") and err.count("\n") == 1
    assert "pass --dataset path/to/data.npz" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_mnist_with_an_empty_root_offline_subprocess(tmp_path):
    """The real torchvision, really trying to download: the proxies point at a closed local port, so it fails
    at once whatever network this machine has. One line on stderr, status 2, nothing written to --out."""
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "",
           "NO_PROXY": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, SCRIPT, "--dataset", "mnist", "--data-root", str(root), "--out", str(out),
                        "--preset", "micro", "--device", "cpu"], capture_output=True, text=True, timeout=120,
                       env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("minicca: error: MNIST is not under --data-root")
    assert os.path.join(str(root), "MNIST", "raw") in lines[0] and "--dataset path/to/data.npz" in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# bring your own .npz: the good cases

def test_npz_grayscale_nhw_without_classes(tmp_path):
    a = arrays(n_train=12, n_test=6, hw=8, classes=4)
    d = minicca.load_dataset(save_npz(tmp_path / "gray.npz", **a))
    assert d["x_train"].shape == (12, 8, 8, 1) and d["x_test"].shape == (6, 8, 8, 1)
    assert d["x_train"].dtype == np.uint8 and np.array_equal(d["x_train"][..., 0], a["x_train"])
    assert d["y_train"].dtype == np.int64 and d["y_train"].tolist() == a["y_train"].tolist()
    assert d["classes"] == ["0", "1", "2", "3"]  # named 0..max label over both splits


def test_npz_rgb_nhwc_with_classes(tmp_path):
    a = arrays(n_train=10, n_test=5, hw=12, channels=3, classes=3)
    d = minicca.load_dataset(save_npz(tmp_path / "rgb.npz", **a, classes=np.array(["cat", "dog", "eel"])))
    assert d["x_train"].shape == (10, 12, 12, 3) and d["x_test"].shape == (5, 12, 12, 3)
    assert np.array_equal(d["x_test"], a["x_test"])
    assert d["classes"] == ["cat", "dog", "eel"]  # (a named class without images is an error: see below)
    assert d["y_test"].dtype == np.int64


def test_npz_rgb_without_classes_and_grayscale_nhwc_with_one_channel(tmp_path):
    d = minicca.load_dataset(save_npz(tmp_path / "a.npz", **arrays(channels=3, classes=3)))
    assert d["x_train"].shape[-1] == 3 and d["classes"] == ["0", "1", "2"]
    d = minicca.load_dataset(save_npz(tmp_path / "b.npz", **arrays(channels=1), classes=np.arange(4)))
    assert d["x_train"].shape == (12, 8, 8, 1) and d["classes"] == ["0", "1", "2", "3"]


def test_default_dataset_is_the_shipped_mnist_subset():
    d = minicca.load_dataset(None)
    assert d["x_train"].shape == (10000, 28, 28, 1) and d["x_test"].shape == (2000, 28, 28, 1)
    assert d["classes"] == [str(i) for i in range(10)]
    assert set(np.unique(d["y_train"]).tolist()) == set(range(10))


# ----------------------------------------------------------------------------------------------------------
# bring your own .npz: every problem is a UserError with a message that says which

def bad(**changes):
    a = arrays()
    for k, v in changes.items():
        if v is None:
            del a[k]
        else:
            a[k] = v
    return a


BAD_NPZ = {
    "missing y_test": (bad(y_test=None), ["missing arrays ['y_test']", "x_train, y_train, x_test, y_test"]),
    "missing two": (bad(x_train=None, y_train=None), ["missing arrays ['x_train', 'y_train']"]),
    "float images": (bad(x_train=np.random.rand(12, 8, 8).astype(np.float32)),
                     ["x_train has dtype float32", "expected uint8"]),
    "int64 images": (bad(x_test=np.zeros((6, 8, 8), np.int64)), ["x_test has dtype int64", "expected uint8"]),
    "2 channels": (bad(x_train=np.zeros((12, 8, 8, 2), np.uint8)), ["x_train has shape (12, 8, 8, 2)",
                                                                  "NHW or NHWC with 1 or 3 channels"]),
    "NCHW": (bad(x_train=np.zeros((12, 3, 8, 8), np.uint8)), ["x_train has shape (12, 3, 8, 8)"]),
    "2-D images": (bad(x_test=np.zeros((6, 64), np.uint8)), ["x_test has shape (6, 64)"]),
    "not multiple of 4": (bad(x_train=np.zeros((12, 10, 8), np.uint8), x_test=np.zeros((6, 10, 8), np.uint8)),
                          ["images are 10x8", "multiples of 4"]),
    "train/test shapes differ": (bad(x_test=np.zeros((6, 12, 12), np.uint8)), ["train images (8, 8, 1)",
                                                                               "test images (12, 12, 1)"]),
    "2-D labels": (bad(y_train=np.zeros((12, 1), np.int64)), ["y_train must be a 1-D array of integer labels"]),
    "float labels": (bad(y_test=np.zeros(6, np.float64)), ["y_test must be a 1-D array of integer labels",
                                                          "float64"]),
    "negative label": (bad(y_train=np.array([0, 1, 2, 3, -1, 0, 1, 2, 3, 0, 1, 2])),
                       ["labels must lie in 0..", "found -1..3"]),
    "label >= len(classes)": ({**arrays(classes=4), "classes": np.array(["a", "b", "c"])},
                              ["labels must lie in 0..2, found 0..3"]),
    "lengths differ": (bad(y_train=np.arange(11) % 4), ["x_train has 12 images but y_train has 11 labels"]),
    "empty test split": (bad(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64)),
                         ["the test split is empty"]),
    "empty train split": (bad(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)),
                          ["the train split is empty"]),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_a_user_error_naming_the_problem(tmp_path, case):
    a, expected = BAD_NPZ[case]
    path = save_npz(tmp_path / "bad.npz", **a)
    with pytest.raises(minicca.UserError) as e:
        minicca.load_dataset(path)
    msg = str(e.value)
    assert msg.startswith(path + ":"), msg  # names the file
    for part in expected:
        assert part in msg, msg
    assert "\n" not in msg
    with pytest.raises(minicca.UserError):  # validate_arrays alone says the same
        minicca.validate_arrays(dict(a), "src")


def test_garbage_npz_missing_file_and_unknown_name(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(300) + b"not a zip at all")
    with pytest.raises(minicca.UserError, match=r"garbage\.npz: not a readable \.npz file"):
        minicca.load_dataset(str(garbage))
    npy = tmp_path / "array.npz"  # an .npy saved under an .npz name
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(minicca.UserError, match=r"array\.npz: not a readable \.npz file"):
        minicca.load_dataset(str(npy))
    pickled = save_npz(tmp_path / "pickled.npz", **arrays(), classes=np.array([{"a": 1}], dtype=object))
    with pytest.raises(minicca.UserError, match="not a readable .npz file"):
        minicca.load_dataset(pickled)  # object arrays would need pickle: refused, not executed
    with pytest.raises(minicca.UserError, match=r"nothere\.npz: no such file"):
        minicca.load_dataset(str(tmp_path / "nothere.npz"))
    for name in ["cifar", "imagenet", str(tmp_path / "data.npy")]:
        with pytest.raises(minicca.UserError, match=r"unknown --dataset .*mnist, cifar10, or a path to an \.npz"):
            minicca.load_dataset(name)


def test_classes_as_a_single_string_is_a_user_error(tmp_path):
    """np.savez(classes="abc") stores a 0-d array; iterating it raised TypeError (a traceback in the CLI)."""
    path = save_npz(tmp_path / "c.npz", **arrays(classes=3), classes=np.array("abc"))
    with pytest.raises(minicca.UserError, match="classes"):
        minicca.load_dataset(path)


def test_images_of_size_zero_are_a_user_error(tmp_path):
    """0x0 images pass the multiple-of-4 check (0 % 4 == 0) and crash later inside the tokenizer."""
    a = arrays()
    a["x_train"], a["x_test"] = np.zeros((12, 0, 0), np.uint8), np.zeros((6, 0, 0), np.uint8)
    path = save_npz(tmp_path / "z.npz", **a)
    with pytest.raises(minicca.UserError) as e:
        minicca.load_dataset(path)
    assert str(e.value).startswith(path)


# ----------------------------------------------------------------------------------------------------------
# classes without training images are bad input (the run would train and score classes it never saw)

def skipped_labels(path):
    """Labels 0, 1, 2 and 99 and no `classes`: classes 3..98 have no images."""
    a = arrays(classes=4)
    a["y_train"] = np.where(a["y_train"] == 3, 99, a["y_train"])
    a["y_test"] = np.where(a["y_test"] == 3, 99, a["y_test"])
    return save_npz(path, **a)


def unused_class_names(path):
    """A `classes` list naming a class ('d') with no training images."""
    a = arrays(classes=3)
    return save_npz(path, **a, classes=np.array(["a", "b", "c", "d"]))


@pytest.mark.parametrize("make, named", [(skipped_labels, ["96 of 100 classes", "3, 4, 5"]),
                                         (unused_class_names, ["1 of 4 classes", "(d)"])],
                         ids=["labels skip values", "a class name without images"])
def test_classes_without_training_images_stop_the_run_before_it_writes(tmp_path, capsys, make, named):
    path = make(tmp_path / "skips.npz")
    with pytest.raises(minicca.UserError) as e:
        minicca.load_dataset(path)
    for part in named + ["have no training images"]:
        assert part in str(e.value), str(e.value)
    out = tmp_path / "out"
    code = 0
    try:
        minicca.main(["--preset", "micro", "--device", "cpu", "--dataset", path, "--out", str(out)])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "have no training images" in err
    assert not out.exists()  # nothing written
