"""The command line end to end on the micro preset: every stage's checkpoint and picture, stage caching
("up to date"), settings that differ from a checkpoint's, --retrain, --help and --sweep (the benchmark,
tools/bench.py, is tested in test_tools).

The pipeline runs once as a real subprocess on a small generated RGB .npz (400 + 100 images of 16x16, 10
classes); the reruns call minicca.main in-process (the ~5 s of imports are paid once) on copies of its --out.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import minicca

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "minicca.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models: 1 thread is fastest
MICRO = {**minicca.COMMON, **minicca.PRESETS["micro"]}  # the defaults, so the names follow them
W, CCA = f"{MICRO['cfg']:g}", minicca.cca_name(MICRO)
STAGE_FILES = ["tokenizer.pt", "tokens.pt", "gpt.pt", f"{CCA}.pt", "classifier.pt"]
PICTURES = ["tokenizer_recon.png", "samples_base.png", f"samples_base_cfg{W}.png", f"compare_{CCA}.png"]
ROWS = ["real (train images)", "base, no guidance", f"base, CFG {W}", f"base, best CFG (w = {W})",
        "cca, no guidance", f"cca, CFG {W}"]  # micro's sweep_cfg [1, 2]: the best scale above 1 is 2
METRICS = ["accuracy", "fid", "is", "precision", "recall"]



def make_npz(path, n_train=400, n_test=100, hw=16, classes=10, rgb=True, seed=0):
    """Classes a tokenizer and a classifier can tell apart: a bright 4x4 square whose place is the class."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 40, (n, hw, hw, 3) if rgb else (n, hw, hw)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = divmod(int(c), hw // 4)
            x[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] = 230
        return x, y
    (xt, yt), (xs, ys) = split(n_train), split(n_test)
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys, classes=np.array([f"c{i}" for i in range(classes)]))
    return str(path)


def run_main(argv, capsys):
    """minicca.main in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        minicca.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in STAGE_FILES}


def ids(folder):
    return {f: torch.load(os.path.join(folder, f), weights_only=True)["id"] for f in STAGE_FILES}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One real `python minicca.py --preset micro --dataset gen.npz --out ...` run."""
    root = tmp_path_factory.mktemp("cli")
    data = make_npz(root / "gen.npz")
    out = root / "out"
    args = ["--preset", "micro", "--device", "cpu", "--dataset", data, "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, env=ENV,
                       cwd=root)
    return {"root": root, "out": out, "args": args, "result": r, "seconds": time.perf_counter() - t0,
            "mtimes": mtimes(out) if r.returncode == 0 else None}


def copy_run(e2e, name):
    dst = e2e["root"] / name
    shutil.copytree(e2e["out"], dst, copy_function=shutil.copy2)  # copy2 keeps mtimes
    return dst, [a if a != str(e2e["out"]) else str(dst) for a in e2e["args"]]


# ----------------------------------------------------------------------------------------------------------
# the first run

def test_end_to_end_writes_every_checkpoint_picture_and_metric(e2e):
    r, out = e2e["result"], e2e["out"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for f in STAGE_FILES:
        ckpt = torch.load(out / f, weights_only=True)
        assert "model" in ckpt or f == "tokens.pt"
        assert set(ckpt["config"]) and len(ckpt["id"]) == 8
    for f in STAGE_FILES[:1] + STAGE_FILES[2:]:
        assert f"saved {out / f}" in r.stdout
    assert f"saved {out / 'tokens.pt'}" in r.stdout
    tokens = torch.load(out / "tokens.pt", weights_only=True)
    assert tokens["train"].shape == (400, 16) and tokens["test"].shape == (100, 16)  # 16x16 -> 4x4 tokens
    assert 0 <= int(tokens["train"].min()) and int(tokens["train"].max()) < 32       # micro: 32 codes
    leftovers = [f for f in os.listdir(out) if f.endswith((".partial", ".tmp"))]
    assert not leftovers

    from PIL import Image
    for f in PICTURES:
        with Image.open(out / f) as im:
            im.verify()
            assert im.format == "PNG"
    with Image.open(out / "samples_base.png") as im:  # a row per class (10), samples_per_class (4) per row
        assert im.size == (4 * 17 + 1, 10 * 17 + 1)
    with Image.open(out / "tokenizer_recon.png") as im:  # 16 test images over their reconstructions
        assert im.size == (16 * 17 + 1, 2 * 17 + 1)

    m = json.loads((out / "metrics.json").read_text())
    assert set(m["rows"]) == set(ROWS)
    for name in ROWS:
        row = m["rows"][name]
        for k in METRICS:
            assert np.isfinite(row[k]), (name, k)
            assert row[f"{k}_std"] >= 0, (name, k)  # --eval-seeds 3 (the default): mean and std
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert 1 - 1e-6 <= row["is"] <= 10 + 1e-6 and row["fid"] >= -1e-6
        assert (row["sec_per_image"] is None) == (name == "real (train images)")
    assert m["seed"] == 0 and m["device"] == "cpu" and m["settings"]["n_embd"] == 32  # the micro preset
    assert m["settings"]["eval_seeds"] == 3 and m["best_cfg"] == 2.0
    assert m["judge"] == "trained here (classifier.pt)"  # an .npz: no shipped judge
    for name in ROWS:
        assert name in r.stdout  # the printed table


# ----------------------------------------------------------------------------------------------------------
# reruns: cached stages, other settings, --retrain

def test_second_run_skips_every_finished_stage(e2e, capsys):
    assert e2e["result"].returncode == 0
    code, out, err = run_main(e2e["args"], capsys)
    assert code == 0, err[-2000:]
    for stage, f in zip(["tokenizer", "tokens", "pretrain", "cca", "classifier"], STAGE_FILES):
        assert f"[{stage}] up to date: {e2e['out'] / f}" in out
    assert not re.search(r"\[(tokenizer|tokens|pretrain|cca|classifier)\] saved", out)
    assert mtimes(e2e["out"]) == e2e["mtimes"]
    assert "it/s" not in err  # no training progress bar: nothing was trained


def test_changed_setting_fails_naming_it_and_retrain(e2e, capsys):
    assert e2e["result"].returncode == 0
    code, out, err = run_main(e2e["args"] + ["--steps", "41"], capsys)
    assert code == 2
    assert err.startswith(f"minicca: error: {e2e['out'] / 'gpt.pt'} was made with other settings")
    assert "steps: 40 -> 41" in err and "--retrain pretrain" in err and err.count("\n") == 1
    code, out, err = run_main(e2e["args"] + ["--cca-lr", "0.002"], capsys)  # the cca file name has no lr in it
    assert code == 2 and "cca_lr: 0.001 -> 0.002" in err and "--retrain cca" in err
    assert mtimes(e2e["out"]) == e2e["mtimes"]


def test_retrain_pretrain_redoes_pretrain_and_cca_only(e2e, capsys):
    assert e2e["result"].returncode == 0
    out_dir, args = copy_run(e2e, "retrain")
    before_m, before_id = mtimes(out_dir), ids(out_dir)
    code, out, err = run_main(args + ["--retrain", "pretrain"], capsys)
    assert code == 0, err[-2000:]
    for stage in ["tokenizer", "tokens", "classifier"]:
        assert f"[{stage}] up to date" in out
    for stage in ["pretrain", "cca"]:
        assert f"[{stage}] saved" in out
    after_m, after_id = mtimes(out_dir), ids(out_dir)
    for f in ["tokenizer.pt", "tokens.pt", "classifier.pt"]:
        assert after_m[f] == before_m[f] and after_id[f] == before_id[f], f
    for f in ["gpt.pt", f"{CCA}.pt"]:
        assert after_id[f] != before_id[f], f
    gpt = torch.load(out_dir / "gpt.pt", weights_only=True)
    cca = torch.load(out_dir / f"{CCA}.pt", weights_only=True)
    assert cca["config"]["base"] == gpt["id"]  # the new fine-tune starts from the new pretrained model
    assert len(gpt["history"]) == 40


def test_tokenizer_command_trains_the_first_stage_alone_and_the_run_reuses_it(e2e, tmp_path, capsys):
    """`python minicca.py tokenizer` stops after the tokenizer; --no-vq-l2-norm reaches its config; the
    pipeline run in the same folder with the same flags finds it up to date and goes on."""
    assert e2e["result"].returncode == 0
    out = tmp_path / "tok"
    args = [a if a != str(e2e["out"]) else str(out) for a in e2e["args"]] + ["--no-vq-l2-norm"]
    code, stdout, err = run_main(["tokenizer", *args], capsys)
    assert code == 0, err[-2000:]
    assert sorted(os.listdir(out)) == ["tokenizer.pt", "tokenizer_recon.png"]
    assert re.search(r"\[tokenizer\] test MSE [0-9.]+, PSNR [0-9]+\.[0-9]{2} dB", stdout)
    ckpt = torch.load(out / "tokenizer.pt", weights_only=True)
    assert ckpt["config"]["vq_l2_norm"] is False and ckpt["vq_config"]["l2_norm"] is False
    code, stdout, err = run_main(["tokenizer", *args[:-1]], capsys)  # the preset's l2 lookup: another
    assert code == 2 and "vq_l2_norm" in err and "--retrain tokenizer" in err  # tokenizer, refused
    code, stdout, err = run_main(args + ["--no-eval"], capsys)  # the pipeline, same flags
    assert code == 0 and f"[tokenizer] up to date: {out / 'tokenizer.pt'}" in stdout
    assert f"[pretrain] saved {out / 'gpt.pt'}" in stdout


# ----------------------------------------------------------------------------------------------------------
# --help, --sweep

def test_help_mentions_the_main_flags(capsys):
    code, out, err = run_main(["--help"], capsys)
    assert code == 0
    for flag in ["--dataset", "--data-root", "--out", "--preset", "--device", "--seed", "--retrain", "--resume",
                 "--save-every", "--steps", "--cfg", "--beta", "--lam", "--loss", "--eval", "--sweep",
                 "tokenizer", "--vq-batch", "--vq-l2-norm", "micro"]:
        assert flag in out, flag


def test_sweep_writes_a_valid_json_and_a_png(e2e, capsys):
    assert e2e["result"].returncode == 0
    out_dir, args = copy_run(e2e, "sweep")
    code, out, err = run_main(args + ["--sweep"], capsys)
    assert code == 0, err[-2000:]
    res = json.loads((out_dir / "sweep.json").read_text())
    assert [p["cfg"] for p in res["cfg"]] == [1.0, 2.0]     # micro's sweep_cfg
    assert [p["lam"] for p in res["lam"]] == [1.0, 10.0]    # micro's sweep_lam
    for p in res["cfg"] + res["lam"]:
        for k in METRICS:
            assert isinstance(p[k], float) and np.isfinite(p[k]), (p, k)
    assert (out_dir / (minicca.cca_name({**MICRO, "lam": 1.0}) + ".pt")).exists()  # a fine-tune per λ; the default λ was cached
    assert "[cca] up to date" in out and "[cca] saved" in out
    from PIL import Image
    with Image.open(out_dir / "sweep.png") as im:
        im.verify()
        assert im.format == "PNG"
    assert f"[sweep] wrote {out_dir / 'sweep.json'} and {out_dir / 'sweep.png'}" in out


def test_pretrained_starts_from_the_shipped_checkpoints(tmp_path):
    """--pretrained: every training stage is up to date from tiny_data/pretrained; straight to sampling and eval."""
    shipped = set(os.listdir(minicca.PRETRAINED))
    assert {"tokenizer.pt", "gpt.pt"} <= shipped and any(f.startswith("cca_") for f in shipped)
    out = tmp_path / "pre"
    r = subprocess.run([sys.executable, SCRIPT, "--pretrained", "--device", "cpu", "--out", str(out),
                        "--eval-samples", "50", "--samples-per-class", "2"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in ("tokenizer", "pretrain", "cca"):
        assert f"[{stage}] up to date" in r.stdout
    assert "[judge] tiny_data/judge_mnist.pt" in r.stdout  # the shipped judge, not one trained here
    assert "Traceback" not in r.stderr
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert rows["cca, no guidance"]["accuracy"] > rows["base, no guidance"]["accuracy"]


# ----------------------------------------------------------------------------------------------------------
# error bars: --eval-seeds

def test_eval_seeds_write_a_std_for_every_metric_and_one_seed_gives_the_single_seed_rows(e2e, capsys):
    assert e2e["result"].returncode == 0
    out_dir, args = copy_run(e2e, "seeds")
    code, out, err = run_main(args + ["--eval-seeds", "2"], capsys)
    assert code == 0, err[-2000:]
    two = json.loads((out_dir / "metrics.json").read_text())["rows"]
    for name in ROWS:
        for k in METRICS:
            assert np.isfinite(two[name][f"{k}_std"]), (name, k)
    assert two["base, no guidance"]["fid_std"] > 0 and two["cca, no guidance"]["fid_std"] > 0  # two sets differ
    assert "±" in out
    code, out, err = run_main(args + ["--eval-seeds", "1"], capsys)
    assert code == 0, err[-2000:]
    m = json.loads((out_dir / "metrics.json").read_text())
    one = m["rows"]
    assert all(one[name][f"{k}_std"] is None for name in ROWS for k in METRICS)
    assert "±" not in out
    # the rows of one set are what a single Judge call with the run's seed gives (the table before --eval-seeds)
    data = minicca.load_dataset(args[args.index("--dataset") + 1])
    load = lambda f: torch.load(out_dir / f, weights_only=True)  # noqa: E731
    tk = load("tokenizer.pt")
    tokenizer = minicca.VQTokenizer(minicca.VQConfig(**tk["vq_config"]))
    tokenizer.load_state_dict(tk["model"])
    tokenizer.eval()
    clf = minicca.JudgeNet(3, 10, MICRO["judge_width"])
    clf.load_state_dict(load("classifier.pt")["model"])
    judge = minicca.Judge(clf, data, tokenizer, (4, 4), m["settings"], torch.device("cpu"), seed=0)
    for name, model in [("base", load("gpt.pt")), ("cca", load(f"{CCA}.pt"))]:
        expected = judge(minicca.load_gpt(model, torch.device("cpu")), 1.0)
        for k in METRICS:
            assert one[f"{name}, no guidance"][k] == expected[k], (name, k)
        two_first = two[f"{name}, no guidance"]  # and the 2-set mean is not simply the first set
        assert any(two_first[k] != expected[k] for k in METRICS)


# ----------------------------------------------------------------------------------------------------------
# --precision bf16: the GPU path's arithmetic, on the CPU

def test_micro_pipeline_in_bf16_on_the_cpu(tmp_path, capsys):
    data = make_npz(tmp_path / "gen.npz")
    out = tmp_path / "bf16"
    code, stdout, err = run_main(["--preset", "micro", "--device", "cpu", "--precision", "bf16",
                                  "--dataset", data, "--out", str(out), "--eval-seeds", "1"], capsys)
    assert code == 0, err[-2000:]
    for f in ["tokenizer.pt", "gpt.pt", f"{CCA}.pt", "classifier.pt"]:
        ckpt = torch.load(out / f, weights_only=True)
        assert ckpt["config"]["precision"] == "bf16"                  # recorded: fp32 runs won't reuse it
        assert all(np.isfinite(h["loss"]) for h in ckpt["history"]), f
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["precision"] == "bf16" and set(m["rows"]) == set(ROWS)
    assert all(np.isfinite(m["rows"][name][k]) for name in ROWS for k in METRICS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and autocast really runs matmuls in bf16 here
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
