"""Which preset a run gets, and the GPU-only branches exercised on the CPU.

A run without --preset gets cpu_rgb for RGB data on a CPU (CIFAR-10's recipe), cpu for grayscale data (the MNIST
one) and gpu on a GPU; every flag still overrides the preset. The CUDA branches of tools/bench.py (CUDA-event timing,
allocator peak memory) run here against a stand-in for torch.cuda that records what it was asked, so a first GPU
run does not find a typo in them.
"""
import argparse
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import minicca

sys.path.insert(0, os.path.join(os.path.dirname(minicca.__file__), "tools"))
import bench  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_npz(path, hw, channels, n=40):
    rng = np.random.default_rng(0)
    shape = (n, hw, hw, channels) if channels == 3 else (n, hw, hw)
    x = rng.integers(0, 255, shape).astype(np.uint8)
    y = np.arange(n) % 10
    np.savez(path, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    return str(path)


def test_the_default_preset_follows_the_device_and_the_images():
    def default(device, dataset):  # what setup() and tools/bench.py pick without --preset
        return minicca.chosen_preset(argparse.Namespace(preset=None, dataset=dataset), device)
    assert default(CPU, "cifar10") == "cpu_rgb"
    assert default(CPU, None) == "cpu" and default(CPU, "mnist") == "cpu"  # the tiny subset, MNIST
    assert default(CUDA, "cifar10") == "gpu" and default(CUDA, None) == "gpu"
    assert [minicca.image_channels(d) for d in [None, "mnist", "cifar10"]] == [1, 1, 3]
    assert minicca.chosen_preset(argparse.Namespace(preset="micro", dataset="cifar10"), CPU) == "micro"


def test_the_channels_of_an_npz_are_read_before_the_settings_are_checked(tmp_path):
    assert minicca.image_channels(make_npz(tmp_path / "rgb.npz", 32, 3)) == 3
    assert minicca.image_channels(make_npz(tmp_path / "gray.npz", 28, 1)) == 1  # (N, H, W)
    x = np.zeros((4, 8, 8, 1), np.uint8)
    np.savez_compressed(tmp_path / "c1.npz", x_train=x, y_train=np.zeros(4, int), x_test=x, y_test=np.zeros(4, int))
    assert minicca.image_channels(str(tmp_path / "c1.npz")) == 1  # (N, H, W, 1), compressed
    assert minicca.image_channels(str(tmp_path / "missing.npz")) is None  # load_dataset says why


@pytest.mark.parametrize("hw, channels, preset", [(32, 3, "cpu_rgb"), (28, 1, "cpu")])
def test_a_run_on_the_cpu_gets_the_preset_of_its_data(tmp_path, capsys, hw, channels, preset):
    data = make_npz(tmp_path / "d.npz", hw, channels)
    r = minicca.setup(minicca.parse_args(["--dataset", data, "--device", "cpu", "--out", str(tmp_path / "o")]))
    assert r.settings == {**minicca.COMMON, **minicca.PRESETS[preset], "precision": "fp32"}
    assert f"preset {preset};" in capsys.readouterr().out


def test_the_rgb_recipe_is_the_cifar_sized_one_and_the_cpu_preset_is_unchanged():
    """The RGB recipe's numbers are the ones the README's CIFAR-10 table was measured with; cpu's are the
    default run's (its checkpoints ship in tiny_data/pretrained), so neither may drift unnoticed."""
    rgb, cpu = minicca.PRESETS["cpu_rgb"], minicca.PRESETS["cpu"]
    assert (rgb["n_layer"], rgb["n_embd"], rgb["steps"], rgb["codebook_size"]) == (4, 128, 4300, 512)
    assert (rgb["cca_epochs"], rgb["cca_lr"], rgb["lr"]) == (1.35, 1e-4, 1e-3)
    assert rgb["vq_lr_floor"] == 0.1 and "vq_lr_floor" not in cpu and minicca.COMMON["vq_lr_floor"] == 1.0
    # the tokenizer: an autoencoder warm-up of 5% of the steps everywhere (cpu_rgb's 100 of 2,000,
    # cpu's 40 of 800); the l2 lookup on RGB, the plain one on MNIST (it reconstructs better there)
    assert minicca.COMMON["vq_ae_warmup"] == 0.05
    assert "vq_ae_warmup" not in rgb and "vq_ae_warmup" not in cpu
    assert minicca.COMMON["vq_l2_norm"] is True and "vq_l2_norm" not in rgb
    assert cpu["vq_l2_norm"] is False
    # CCA's push and the CFG grid: λ 30 for the weak CIFAR-10 base, 10 (COMMON) for MNIST; the grid
    # reaches past CFG's best CIFAR-10 scale (w ≈ 10), so the best-CFG row is not capped by the grid
    assert rgb["lam"] == 30.0 and "lam" not in cpu and minicca.COMMON["lam"] == 10.0
    assert max(rgb["sweep_cfg"]) == 12.0 and "sweep_cfg" not in cpu
    assert (cpu["n_layer"], cpu["n_embd"], cpu["steps"], cpu["vq_steps"]) == (4, 128, 800, 800)


def override_value(value):
    """A value of the same type that no preset uses."""
    if isinstance(value, (bool, str, list)) or value is None:
        return None  # choices and lists have tests of their own
    return value + 3 if isinstance(value, int) else value * 0.37


@pytest.mark.parametrize("preset", ["cpu_rgb", "cpu"])
def test_every_flag_overrides_the_preset_the_data_chose(tmp_path, preset):
    channels = 3 if preset == "cpu_rgb" else 1
    data = make_npz(tmp_path / "d.npz", 32 if channels == 3 else 28, channels)
    parser_dests = {a.dest: a.option_strings[0] for a in argparse_actions()}
    base = {**minicca.COMMON, **minicca.PRESETS[preset]}
    flags, expected = [], {}
    for key, value in base.items():
        new = override_value(value)
        if key not in parser_dests or new is None or isinstance(value, list):
            continue
        if key in ("n_head", "n_embd"):
            continue  # their ratio must divide; checked together below
        if key in ("uncond_ratio", "cond_dropout", "top_p"):
            new = 0.05
        flags += [parser_dests[key], str(new)]
        expected[key] = new
    flags += ["--n-head", "3", "--n-embd", "48"]
    expected.update(n_head=3, n_embd=48)
    assert len(expected) >= 20  # the tokenizer, model, training, CCA and evaluation flags
    args = minicca.parse_args(["--dataset", data, "--device", "cpu", "--out", str(tmp_path / "o"), *flags])
    r = minicca.setup(args)
    for key, value in expected.items():
        assert r.settings[key] == pytest.approx(value), key
    micro = minicca.setup(minicca.parse_args(["--dataset", data, "--device", "cpu", "--preset", "micro",
                                              "--out", str(tmp_path / "m")]))
    assert micro.settings["n_embd"] == minicca.PRESETS["micro"]["n_embd"]  # --preset itself overrides the choice


def argparse_actions():
    """The option actions of minicca's parser."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        captured["parser"] = self
        return original(self, argv, namespace)
    argparse.ArgumentParser.parse_args = grab
    try:
        minicca.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return [a for a in captured["parser"]._actions if a.option_strings]


def test_the_tokenizer_rate_is_constant_at_floor_one_and_decays_to_the_floor_below_it():
    constant = minicca.cosine_lr(2e-3, 100, warmup_frac=0.0, floor=1.0)
    assert all(constant(step) == 2e-3 for step in range(0, 120))  # bit for bit: the cpu preset's runs
    decaying = minicca.cosine_lr(2e-3, 100, warmup_frac=0.0, floor=0.1)
    assert decaying(0) == 2e-3 and decaying(99) == pytest.approx(2e-4, rel=0.01) and decaying(100) == 2e-4
    assert 2e-4 < decaying(50) < 2e-3


# the CUDA branches, against a stand-in for torch.cuda

class FakeCuda:
    """What timed() and peak_memory() call on torch.cuda, with answers the test can predict."""

    def __init__(self):
        self.calls = []
        self.allocated = 1000

    def synchronize(self):
        self.calls.append("synchronize")

    def Event(self, enable_timing=False):
        assert enable_timing, "events without timing cannot measure"
        fake = self

        class Event:
            def record(self):
                fake.calls.append("record")
                self.at = len(fake.calls)

            def elapsed_time(self, end):
                return 250.0  # milliseconds between the two records
        return Event()

    def reset_peak_memory_stats(self):
        self.calls.append("reset")
        self.peak = self.allocated

    def memory_allocated(self):
        return self.allocated

    def max_memory_allocated(self):
        return self.peak


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ["synchronize", "Event", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"]:
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_timed_on_cuda_uses_events_between_synchronisations(fake_cuda):
    calls = []
    seconds = bench.timed(lambda: calls.append(1), CUDA, repeat=5)
    assert seconds == pytest.approx(250.0 / 1000 / 5)  # elapsed_time is in ms, per call
    assert len(calls) == 6  # one warm-up call, then the five timed ones
    assert fake_cuda.calls == ["synchronize", "record", "record", "synchronize"]


def test_peak_memory_on_cuda_is_the_allocator_peak_above_the_start(fake_cuda):
    def work():
        fake_cuda.peak = fake_cuda.allocated + 5000  # a temporary of 5000 bytes, freed again
    assert bench.peak_memory(work, CUDA) == 5000
    assert fake_cuda.calls == ["synchronize", "reset", "synchronize"]


def test_peak_memory_on_the_cpu_sees_a_large_temporary():
    """In a fresh process: inside the suite, memory that earlier tests freed but the process still holds
    can serve the temporary without any growth of resident memory (seen once in CI: 0 bytes)."""
    script = ("import sys, torch\n"
              "sys.path.insert(0, 'tools')\n"
              "import bench\n"
              "def work():\n"
              "    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
              "    x.add_(1)\n"
              "print(bench.peak_memory(work, torch.device('cpu')))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()[-1]
    assert out == "None" or int(out) > 32 * 2**20


def test_autocast_on_cuda_asks_for_bf16_and_on_the_cpu_only_when_told(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, device_type, dtype=None, enabled=True):
            seen.append((device_type, dtype, enabled))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch, "autocast", Recorder)
    for device, precision in [(CUDA, None), (CUDA, "bf16"), (CPU, "bf16")]:
        with minicca.autocast(device, minicca.resolve_precision(precision, device)):
            pass
    assert [s[:2] for s in seen if s[2]] == [("cuda", torch.bfloat16)] * 2 + [("cpu", torch.bfloat16)]
    assert minicca.resolve_precision(None, CPU) == "fp32" and minicca.resolve_precision(None, CUDA) == "bf16"


# the gpu preset's FLOP counts in docs/results.md ("The `gpu` preset on one H200")

def train_flops(model, *inputs):
    """FLOPs of one forward and backward pass (torch's FLOP counter: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        out = model(*inputs)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return counter.get_total_flops()


def test_the_readme_gpu_arithmetic_matches_the_preset():
    """The numbers the README's estimate starts from: run with -s to print them."""
    P = {**minicca.COMMON, **minicca.PRESETS["gpu"]}
    gpt = minicca.GPT(minicca.GPTConfig(P["codebook_size"], 10, 64, P["n_layer"], P["n_head"], P["n_embd"]))
    params = sum(p.numel() for p in gpt.parameters())
    seq = train_flops(gpt, torch.randint(0, P["codebook_size"], (2, 64)), torch.zeros(2, dtype=torch.long)) / 2
    tok = minicca.VQTokenizer(minicca.VQConfig(3, P["vq_hidden"], P["codebook_size"], P["code_dim"], l2_norm=True))
    img = train_flops(tok, torch.rand(2, 3, 32, 32)) / 2
    pretrain = seq * P["batch_size"] * P["steps"]
    cca_steps = 50_000 // P["batch_size"] + 1  # one epoch of CIFAR-10
    cca = 4 / 3 * 2 * seq * P["batch_size"] * cca_steps  # policy fwd+bwd on 2B rows, reference fwd on 2B
    tokenizer = img * P["vq_batch"] * P["vq_steps"]
    print(f"\nGPT {params / 1e6:.2f}M parameters, {seq / 1e9:.2f} GFLOP per sequence (forward + backward); "
          f"tokenizer {img / 1e9:.3f} GFLOP per image; pretraining {pretrain / 1e15:.1f} PFLOP, CCA "
          f"{cca / 1e15:.2f} PFLOP, tokenizer {tokenizer / 1e15:.2f} PFLOP")
    assert round(params / 1e6, 1) == 14.6                   # README: 14.6M parameters
    assert round(seq / 1e9, 1) == 5.5                       # 5.5 GFLOP per 64-token sequence
    assert round(pretrain / 1e15) == 28                     # 28 PFLOP of pretraining
    assert round(cca / 1e15, 1) == 0.7 and round(tokenizer / 1e15, 1) == 1.0
    assert seq == pytest.approx(6 * params * 64, rel=0.1)   # the 6·N·T rule, attention being small at T = 64


class Rates(minicca.Hooks):
    """Hooks that record the rate of each step and the weights after chosen steps."""

    def __init__(self, keep=()):
        self.rates, self.keep, self.kept = [], set(keep), {}

    def after_step(self, model, optimizer, history, num_steps):
        self.rates.append(optimizer.param_groups[0]["lr"])
        if len(history) in self.keep:
            self.kept[len(history)] = {k: v.clone() for k, v in model.state_dict().items()}


def micro_finetune(hooks, **changes):
    """finetune_cca of a fresh micro GPT on random tokens: (checkpoint, hooks)."""
    P = {**minicca.COMMON, **minicca.PRESETS["micro"], **changes}
    torch.manual_seed(0)
    gpt = minicca.GPT(minicca.GPTConfig(16, 3, 4, 1, 2, 16))
    tokens = torch.randint(0, 16, (96, 4))
    labels = torch.arange(96) % 3
    return minicca.finetune_cca(gpt, tokens, labels, P, 0, CPU, hooks), hooks


def test_the_cca_rate_is_constant_by_default_and_a_warm_cosine_when_asked():
    _, constant = micro_finetune(Rates(), cca_epochs=4.0, cca_lr=1e-3)
    assert constant.rates == [1e-3] * 12  # 4 epochs of 96 rows at batch 32, at exactly cca_lr
    _, scheduled = micro_finetune(Rates(), cca_epochs=4.0, cca_lr=1e-3, cca_lr_warmup=0.25,
                                  cca_lr_floor=0.0)
    rates = scheduled.rates
    assert rates[:4] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])  # warm-up, then the peak
    assert all(a > b for a, b in zip(rates[3:], rates[4:])) and rates[-1] < 1e-4  # cosine to ~0


def test_a_shorter_cca_run_ends_with_the_weights_a_longer_one_has_at_its_last_step():
    """The study's rows of one λ at several lengths come from one long run: at the constant rate
    each step's batch and rate depend on the step alone, so stopping early changes nothing."""
    short, _ = micro_finetune(Rates(), cca_epochs=1.0)
    _, long = micro_finetune(Rates(keep=[3]), cca_epochs=2.0)
    assert len(short["history"]) == 3 and len(long.rates) == 6
    for name, value in short["model"].items():
        assert torch.equal(value, long.kept[3][name]), name


def test_the_cca_batch_is_pretrainings_unless_its_own_flag_sets_it():
    default, _ = micro_finetune(Rates(), cca_epochs=1.0)
    larger, _ = micro_finetune(Rates(), cca_epochs=1.0, cca_batch_size=48)
    assert len(default["history"]) == 3 and len(larger["history"]) == 2  # 96 rows: 32 or 48 a step
    args = minicca.parse_args(["--preset", "micro", "--cca-batch-size", "48"])
    assert minicca.checked_settings(args, "micro", CPU)["cca_batch_size"] == 48
    args = minicca.parse_args(["--preset", "micro", "--cca-batch-size", "0"])
    with pytest.raises(minicca.UserError, match="--cca-batch-size must be > 0, got 0"):
        minicca.checked_settings(args, "micro", CPU)


def test_a_fine_tune_with_a_schedule_or_its_own_batch_has_a_file_of_its_own():
    rgb = {**minicca.COMMON, **minicca.PRESETS["cpu_rgb"]}
    assert minicca.cca_name(rgb) == "cca_cca_b0.1_l30_e1.35"  # the recipe's: no suffix
    scheduled = {**rgb, "cca_lr": 3e-4, "cca_lr_warmup": 0.05, "cca_lr_floor": 0.1}
    assert minicca.cca_name(scheduled) == "cca_cca_b0.1_l30_e1.35_lr0.0003w0.05f0.1"
    assert minicca.cca_name({**rgb, "cca_batch_size": 256}) == "cca_cca_b0.1_l30_e1.35_bs256"
