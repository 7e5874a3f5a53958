"""The maintainer's scripts in tools/ run on the micro preset: exporting a run's checkpoints as the
reference ones (float16 weights, loadable, and --pretrained starts from them), making a judge
from the command line (the other script, tools/make_judge.py, is also exercised in test_judges),
the speed benchmark printing every ratio (its CUDA branches: test_presets), and the over-fitting
curve printing a line per checkpoint."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import minicca

ROOT = os.path.dirname(os.path.abspath(minicca.__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tool(*argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", argv[0]), *argv[1:]],
                       capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_export_pretrained_on_a_micro_run(tmp_path):
    run = tmp_path / "run"
    minicca.main(["--preset", "micro", "--out", str(run), "--no-eval"])
    dest = tmp_path / "pretrained"
    out = tool("export_pretrained.py", str(run), "--dest", str(dest), "--preset", "micro")
    cca = minicca.cca_name({**minicca.COMMON, **minicca.PRESETS["micro"]}) + ".pt"
    assert sorted(os.listdir(dest)) == sorted(["tokenizer.pt", "gpt.pt", cca])
    assert "MiB" in out
    for f in os.listdir(dest):
        full = torch.load(run / f, weights_only=True)
        half = torch.load(dest / f, weights_only=True)
        assert half["config"] == full["config"] and half["id"] == full["id"]
        for k, v in half["model"].items():
            assert v.dtype == (torch.float16 if full["model"][k].is_floating_point()
                               else full["model"][k].dtype), k
            assert torch.equal(v, full["model"][k].to(v.dtype)), k
    # a run in the exported folder finds every stage up to date
    again = subprocess.run([sys.executable, os.path.join(ROOT, "minicca.py"), "--preset", "micro",
                            "--out", str(dest), "--no-eval"], capture_output=True, text=True,
                           env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    for stage in ["tokenizer", "pretrain", "cca"]:
        assert f"[{stage}] up to date" in again.stdout, again.stdout


def test_make_judge_from_the_command_line(tmp_path):
    rng = np.random.default_rng(1)
    npz = tmp_path / "gray.npz"
    images = rng.integers(0, 256, (90, 12, 12), dtype=np.uint8)
    np.savez(npz, x_train=images[:60], y_train=np.arange(60) % 2, x_test=images[60:],
             y_test=np.arange(30) % 2)
    out = tmp_path / "judges" / "j.pt"
    printed = tool("make_judge.py", "--dataset", str(npz), "--judge-epochs", "0.5", "--out",
                   str(out), "--device", "cpu")
    assert set(torch.load(out, weights_only=True)) == {"model", "judge_config", "info"}
    judge = minicca.load_judge(str(out))
    assert judge.info["image_shape"] == [12, 12, 1] and judge.info["classes"] == ["0", "1"]
    assert judge.info["test_accuracy_flip"] is None and not judge.flip_average  # digits: no flips
    assert judge.info["command"].startswith("python tools/make_judge.py --dataset ")
    assert judge.info["epochs"] == 0.5
    assert "[judge] test accuracy" in printed and str(out) in printed


def test_bench_prints_every_ratio():
    out = tool("bench.py", "--preset", "micro", "--device", "cpu", "--seed", "1")
    num = r"\s+(\d+(\.\d+)?)x"
    for label in [r"guidance-free / CFG sampling, equal rows (128):",
                  r"guidance-free / CFG sampling, each at its best batch:",
                  r"guidance-free / CFG sampling, same batch 64:",
                  r"KV cache / full recompute, batch 16:",
                  r"CCA step / pretraining step time:"]:
        m = re.search(re.escape(label) + num, out)
        assert m, label
        assert float(m.group(1)) > 0
    assert re.search(r"one CCA epoch \(\d+ images\) / pretraining \(40 steps\): \d+(\.\d+)?%", out)
    assert re.search(r"pretraining [\d,]+ tokens/s, CCA [\d,]+ tokens/s", out)
    for batch in [4, 16, 64]:
        assert re.search(rf"batch\s+{batch}: guidance-free\s+\d+(\.\d+)? img/s, "
                         rf"CFG\s+\d+(\.\d+)? img/s", out)
    mem = out.split("peak memory:")[1]
    for k in ["pretrain step", "CCA step", "CFG sampling", "guidance-free sampling"]:
        assert re.search(rf"\n  {k}: (n/a here|-?\d+(\.\d+)? MiB)", mem), k
    precision = out.split("bf16 autocast against fp32")[1]
    for k in ["tokenizer step", "pretraining step", "CCA step",
              "guidance-free sampling, a batch of 256"]:
        line = rf"\n  {k}: fp32 (\S+) s, bf16 (\S+) s: bf16 (\d+\.\d+)x as fast"
        m = re.search(line, precision)
        assert m, k
        assert float(m.group(3)) == pytest.approx(float(m.group(1)) / float(m.group(2)), rel=0.02)


def test_overfit_curve_prints_a_line_per_checkpoint(tmp_path, capsys):
    """In this process (a subprocess would double the time): two runs, with torch's generator
    moved between them, print the same bits, since --seed seeds the initial weights."""
    spec = importlib.util.spec_from_file_location("overfit_curve",
                                                  os.path.join(ROOT, "tools", "overfit_curve.py"))
    overfit_curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overfit_curve)
    rng = np.random.default_rng(2)
    npz = tmp_path / "noise.npz"
    images = rng.integers(0, 256, (160, 12, 12), dtype=np.uint8)
    np.savez(npz, x_train=images[:120], y_train=np.arange(120) % 3, x_test=images[120:],
             y_test=np.arange(40) % 3)
    argv = ["--dataset", str(npz), "--device", "cpu", "--preset", "micro", "--steps", "25",
            "--vq-steps", "10", "--every", "10"]
    line = re.compile(r"step +(\d+) epoch +(\d+\.\d): bits/token train (\S+) test (\S+)  "
                      r"\(\d+ s\)")
    runs = []
    for _ in range(2):
        torch.rand(7)
        overfit_curve.main(argv)
        out = capsys.readouterr().out
        assert re.match(r"tokenizer \d+ s; tokens \(120, 9\)\n", out)
        runs.append([line.fullmatch(text).groups() for text in out.splitlines()[1:]])
    rows = runs[0]
    assert [int(r[0]) for r in rows] == [10, 20, 25]      # every 10 steps, and the last
    assert [r[1] for r in rows] == ["2.7", "5.3", "6.7"]  # 120 sequences at batch 32 an epoch
    bits = [float(b) for r in rows for b in r[2:]]
    assert all(0 < b < 20 for b in bits), bits             # finite and positive
    assert runs[1] == rows
