"""Several processes under torchrun (DDP), on CPU with Gloo, on the micro preset of the default (tiny MNIST) data.

The oracle is one process: with the same global batch and data order, two ranks that each take half of every
batch and average gradients must log the same losses and end with the same weights, up to float rounding.

Runs (each a real `python -m torch.distributed.run`, ~5-10 s here):
  one    1 process, the whole pipeline with --sweep            (the reference)
  two    2 processes, the same from scratch                    (every stage under DDP; rank-0-only output)
  again  a copy of `one`, pretraining and CCA redone by 2 processes on the same tokens (same weights as `one`)
CCA uses --collisions mask --uncond-ratio 0, so no row is flagged and the step-0 loss has the closed form
(1 + λ)·log 2 / max(λ, 1) whatever the batch holds.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import minicca

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "minicca.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FLAGS = ["--preset", "micro", "--collisions", "mask", "--uncond-ratio", "0",
         "--judge", "train"]  # a judge trained here, so that training one under DDP is tested too
CCA = minicca.cca_name({**minicca.COMMON, **minicca.PRESETS["micro"], "collisions": "mask", "uncond_ratio": 0.0})
LAM = minicca.COMMON["lam"]


def launch(out, *flags, nproc=2):
    """(return code, stdout + stderr) of minicca.py under torchrun (nproc > 1) or plain python."""
    cmd = [sys.executable, SCRIPT] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
    p = subprocess.run(cmd + ["--out", str(out), *FLAGS, *flags], env=ENV, capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one, two, again = root / "one", root / "two", root / "again"
    code, log_one = launch(one, "--sweep", nproc=1)
    assert code == 0, log_one
    code, log_two = launch(two, "--sweep")
    assert code == 0, log_two
    shutil.copytree(one, again)
    code, log_again = launch(again, "--retrain", "pretrain", "--no-eval")
    assert code == 0, log_again
    return {"one": one, "two": two, "again": again, "log_two": log_two, "log_again": log_again}


def ckpt(folder, name):
    return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)


def losses(c):
    return torch.tensor([h["loss"] for h in c["history"]], dtype=torch.float64)


def test_pretraining_two_processes_equal_one(runs):
    """Same tokens, same global batch and order: the same per-step losses and final weights as one process."""
    a, b = ckpt(runs["one"], "gpt.pt"), ckpt(runs["again"], "gpt.pt")
    assert len(a["history"]) == len(b["history"]) == minicca.PRESETS["micro"]["steps"]
    assert torch.allclose(losses(a), losses(b), rtol=0, atol=1e-5), (losses(a) - losses(b)).abs().max()
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-4), k
    # the weights moved a lot compared with the tolerance: equality is not trivial
    init = minicca.GPT(minicca.GPTConfig(**a["gpt_config"])).state_dict()
    assert max((a["model"][k] - init[k]).abs().max() for k in init) > 0.05


def test_tokenizer_two_processes_equal_one(runs):
    """The tokenizer (with its dead-code restarts made on the global batch) trains the same on two ranks."""
    a, b = ckpt(runs["one"], "tokenizer.pt"), ckpt(runs["two"], "tokenizer.pt")
    assert torch.allclose(losses(a), losses(b), rtol=1e-4, atol=1e-5), (losses(a) - losses(b)).abs().max()
    diffs = {k: (a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]}
    # Adam moves a weight by about lr = 2e-3 a step whatever the gradient's size, so a near-zero
    # gradient whose sign differs in the last float bits between the runs costs up to 2 lr: allow
    # 2.5 steps' worth (measured 3.3e-3 with the l2-normalised lookup, whose gradients are small)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=5e-3), (k, diffs)
    assert diffs["codebook.weight"] < 1e-3  # the same codes were restarted in both runs


@pytest.mark.parametrize("run", ["two", "again"])
def test_cca_under_two_processes_starts_at_the_closed_form(runs, run):
    """Policy = reference at step 0, so every gap is 0 and the loss is (1 + λ)·log 2 / max(λ, 1) on each rank."""
    c = ckpt(runs[run], f"{CCA}.pt")
    first = c["history"][0]
    assert first["loss"] == pytest.approx((1 + LAM) * math.log(2) / max(LAM, 1.0), abs=1e-6)
    assert first["gap_pos"] == first["gap_neg"] == 0.0
    assert len(c["history"]) == math.ceil(minicca.PRESETS["micro"]["cca_epochs"] * 10_000 /
                                          minicca.PRESETS["micro"]["batch_size"])  # the global batch sets steps
    assert c["history"][-1]["gap_pos"] != 0.0  # and then it trains


def test_classifier_under_two_processes_tracks_one(runs):
    """The judge trains under DDP too; BatchNorm uses each rank's half batch, so close, not equal."""
    a, b = losses(ckpt(runs["one"], "classifier.pt")), losses(ckpt(runs["two"], "classifier.pt"))
    assert len(a) == len(b)
    assert (a - b).abs().mean() < 0.05


def test_only_rank_zero_prints_and_writes(runs):
    log = runs["log_two"]
    saved = {"tokenizer": 1, "tokens": 1, "pretrain": 1, "cca": 2, "classifier": 1}  # cca: λ 10, then the sweep's λ 1
    for stage, times in saved.items():
        assert log.count(f"[{stage}] saved") == times, stage  # one rank speaks
    assert log.count("| base, no guidance |") == 1 and log.count("[sweep] wrote") == 1
    assert "2 processes (DDP), global batch 32" in log
    files = sorted(os.listdir(runs["two"]))
    assert files == sorted(os.listdir(runs["one"]))  # the same outputs as one process
    assert not [f for f in files if f.endswith((".partial", ".tmp")) or f.startswith(".write_test")]
    metrics = json.load(open(os.path.join(runs["two"], "metrics.json")))
    assert metrics["processes"] == 2 and json.load(open(os.path.join(runs["one"], "metrics.json")))["processes"] == 1


def test_batch_must_split_evenly(tmp_path):
    code, log = launch(tmp_path / "odd", "--batch-size", "33")
    assert code != 0
    assert "--batch-size must be a multiple of the 2 processes, got 33" in log


def test_bench_is_one_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(REPO, "tools", "bench.py"), "--preset", "micro"], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "bench measures one process: run it with python, not torchrun" in p.stdout + p.stderr


def test_shard_splits_a_batch_like_distributed_sampler(monkeypatch):
    """Rank r of W takes rows r, r+W, ...: disjoint, covering, equal halves (DistributedSampler's split)."""
    SAVES = minicca.Saves("unused.partial", {}, torch.device("cpu"), 0, False)
    batch = torch.arange(8)
    monkeypatch.setattr(minicca, "WORLD", 2)
    parts = []
    for r in range(2):
        monkeypatch.setattr(minicca, "RANK", r)
        parts.append(SAVES.shard(batch))
    assert parts[0].tolist() == [0, 2, 4, 6] and parts[1].tolist() == [1, 3, 5, 7]
    monkeypatch.setattr(minicca, "WORLD", 1)
    monkeypatch.setattr(minicca, "RANK", 0)
    assert SAVES.shard(batch).tolist() == batch.tolist()  # one process: the whole batch


def test_ctrl_c_and_resume_under_torchrun(tmp_path, runs):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops both ranks with rank 0's
    message once and a .partial save; --resume then ends bit-identical to an uninterrupted two-process run."""
    import signal
    import time
    flags = ["--steps", "400", "--save-every", "50", "--no-cca", "--no-eval", "--retrain", "pretrain"]
    shutil.copytree(runs["one"], tmp_path / "whole")
    shutil.copytree(runs["one"], tmp_path / "cut")
    os.remove(tmp_path / "cut" / "gpt.pt")
    code, log = launch(tmp_path / "whole", *flags)
    assert code == 0, log
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           "--out", str(tmp_path / "cut"), *FLAGS, *flags]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    partial = tmp_path / "cut" / "gpt.pt.partial"
    deadline = time.time() + 300
    while not partial.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    log = p.communicate(timeout=120)[0]
    assert p.returncode != 0 and partial.exists(), log
    assert log.count("[pretrain] interrupted") == 1, log  # rank 0 reports it, once
    assert not (tmp_path / "cut" / "gpt.pt").exists()
    code, log = launch(tmp_path / "cut", *[f for f in flags if f not in ("--retrain", "pretrain")], "--resume")
    assert code == 0, log
    assert "[pretrain] resuming from step" in log
    a, b = ckpt(tmp_path / "whole", "gpt.pt"), ckpt(tmp_path / "cut", "gpt.pt")
    assert a["history"] == b["history"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_error_on_one_rank_is_one_clear_line(tmp_path):
    """Rank 0 reports the user's mistake; the rank left waiting for it stops without a traceback of ours."""
    code, log = launch(tmp_path / "x", "--dataset", str(tmp_path / "missing.npz"))
    assert code != 0
    assert f"minicca: error: --dataset {tmp_path / 'missing.npz'}: no such file" in log
    assert "[rank1]:" not in log  # no traceback from rank 1
