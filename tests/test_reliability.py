"""Reliability of the command line: bad input gets one clear line, status 2 and no traceback, and changes nothing
on disk; checkpoints from other settings or damaged ones are named with the way out; writes are atomic;
--resume after Ctrl-C ends with the weights of an uninterrupted run; a non-finite loss stops cleanly; the same
seed gives the same tokens, pictures and metrics.

Most runs call minicca.main in-process on a small generated .npz (16x16 grayscale, 10 classes); a few are real
subprocesses where the point is what a person sees (no "Traceback") or a real SIGINT.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import minicca

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "minicca.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same 1 thread as in-process
CCA_FILE = minicca.cca_name({**minicca.COMMON, **minicca.PRESETS["micro"]}) + ".pt"
STAGES = {"tokenizer.pt": "tokenizer", "tokens.pt": "tokens", "gpt.pt": "pretrain", CCA_FILE: "cca",
          "classifier.pt": "classifier"}



def make_npz(path, n_train=400, n_test=100, hw=16, n_classes=10, seed=0, **override):
    """Grayscale classes a tokenizer can tell apart: a bright 4x4 square whose place is the class."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % n_classes
        x = rng.integers(0, 40, (n, hw, hw)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = divmod(int(c), hw // 4)
            x[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] = 230
        return x, y
    (xt, yt), (xs, ys) = split(n_train), split(n_test)
    a = dict(x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    a.update(override)
    np.savez(path, **a)
    return str(path)


def run_main(argv, capsys):
    """minicca.main in-process: (exit code, stdout, stderr). Any exception other than SystemExit is what the
    CLI would show as a traceback, so it fails the test with that said."""
    code = 0
    try:
        minicca.main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001
        captured = capsys.readouterr()
        pytest.fail(f"uncaught {type(e).__name__}: {e} (the CLI prints a traceback)\n"
                    + "\n".join(captured.err.strip().splitlines()[-3:]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(args, cwd, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=cwd)


def one_error_line(err):
    """stderr holds exactly one line, the CLI's error."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minicca: error: "), err[-2000:]
    return lines[0]


def last_line(err):
    """The last line of stderr (progress bars come before it), checked to be the CLI's error."""
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("minicca: error: "), err[-2000:]
    return line


def snapshot(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f.endswith((".pt", ".partial"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "gen.npz")


@pytest.fixture(scope="module")
def done(tmp_path_factory, data):
    """A finished micro run (every stage, seed 0), in-process. Tests work on copies of its folder."""
    out = tmp_path_factory.mktemp("done") / "out"
    args = ["--preset", "micro", "--device", "cpu", "--dataset", data, "--out", str(out)]
    code = 0
    try:
        minicca.main(args)
    except SystemExit as e:
        code = e.code
    assert code == 0
    return out, args


def copy_of(done, tmp_path, name="out"):
    out, args = done
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return dst, [a if a != str(out) else str(dst) for a in args]


# ----------------------------------------------------------------------------------------------------------
# invalid settings: one line, status 2, and the --out folder is not created

INVALID = [  # (extra flags, what the message says)
    (["--beta", "0"], "--beta must be > 0, got 0.0"),
    (["--lam", "-1"], "--lam must be >= 0, got -1.0"),
    (["--uncond-ratio", "1.0"], "--uncond-ratio must be in [0, 1), got 1.0"),
    (["--cfg", "-1"], "--cfg must be >= 0, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    (["--cond-dropout", "1"], "--cond-dropout must be in [0, 1), got 1.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd must be a multiple of --n-head"),
    (["--dataset", "nonsense"], "unknown --dataset 'nonsense'"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available here"),
    (["--pretrained"], "--pretrained uses the checkpoints shipped in tiny_data/"),  # with --dataset gen.npz
]
ARGPARSE = [
    (["--preset", "unknown"], "argument --preset: invalid choice: 'unknown'"),
    (["--device", "unknown"], "argument --device: invalid choice: 'unknown'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--retrain", "everything"], "argument --retrain: invalid choice: 'everything'"),
]


@pytest.mark.parametrize("extra,message", INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_setting_is_one_line_and_writes_nothing(tmp_path, data, capsys, extra, message):
    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "out"
    code, stdout, err = run_main(["--preset", "micro", "--dataset", data, "--out", str(out), *extra], capsys)
    assert code == 2
    assert message in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("extra,message", ARGPARSE, ids=[" ".join(a) for a, _ in ARGPARSE])
def test_argparse_errors_exit_2_naming_the_flag(tmp_path, data, capsys, extra, message):
    out = tmp_path / "out"
    code, stdout, err = run_main(["--preset", "micro", "--dataset", data, "--out", str(out), *extra], capsys)
    assert code == 2 and message in err and err.startswith("usage: minicca.py")
    assert not out.exists()


BUGS = [  # settings that crashed with a traceback instead of a one-line error
    (["--n-head", "0"], "--n-head"),          # ZeroDivisionError in the n_embd % n_head check
    (["--n-head", "-2"], "--n-head"),         # RuntimeError in the attention's view
    (["--dropout", "1.5"], "--dropout"),      # ValueError from nn.Dropout
    (["--codebook-size", "0"], "--codebook-size"),  # IndexError in quantize
    (["--save-every", "-1"], "--save-every"),  # accepted silently: saved at every step
]


@pytest.mark.parametrize("extra,flag", BUGS, ids=[" ".join(a) for a, _ in BUGS])
def test_more_invalid_settings_are_one_line_errors(tmp_path, data, capsys, extra, flag):
    out = tmp_path / "out"
    code, stdout, err = run_main(["--preset", "micro", "--dataset", data, "--out", str(out), "--no-eval",
                                  "--no-cca", *extra], capsys)
    assert code == 2, f"exit {code}: {err[-500:]}"
    assert flag in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--seed", "-1"], ["--eval-samples", "3"]], ids=["seed -1", "eval-samples 3"])
def test_settings_that_crashed_at_evaluation_either_work_or_fail_up_front(tmp_path, data, capsys, extra):
    """--seed -1 reached np.random.default_rng (ValueError) and --eval-samples 3 the k-NN of precision/recall
    (kthvalue out of range), both after every stage had trained. Either is fine once fixed: a run that
    finishes, or a one-line error before anything is written."""
    out = tmp_path / "out"
    code, stdout, err = run_main(["--preset", "micro", "--dataset", data, "--out", str(out), "--no-cca", *extra],
                                 capsys)
    if code == 0:
        assert (out / "metrics.json").exists()
    else:
        assert code == 2 and extra[0] in one_error_line(err) and not out.exists()


def test_a_test_split_too_small_for_the_metrics_fails_cleanly(tmp_path, capsys):
    """3 test images: precision/recall's k-NN (k=3) crashed after training (kthvalue out of range)."""
    data = make_npz(tmp_path / "small.npz", n_train=40, n_test=3)
    out = tmp_path / "out"
    code, stdout, err = run_main(["--preset", "micro", "--dataset", data, "--out", str(out), "--no-cca"], capsys)
    if code == 0:
        assert (out / "metrics.json").exists()
    else:
        assert code == 2 and "test" in one_error_line(err) and not out.exists()


def test_pretrained_without_the_shipped_checkpoints_is_a_user_error(tmp_path, monkeypatch, capsys):
    """--pretrained with tiny_data/pretrained missing: os.listdir raised FileNotFoundError (a traceback), after
    --out had been created."""
    monkeypatch.setattr(minicca, "PRETRAINED", str(tmp_path / "no_such_folder"))
    out = tmp_path / "out"
    code, stdout, err = run_main(["--pretrained", "--out", str(out)], capsys)
    assert code == 2
    assert "pretrained" in one_error_line(err)


# ----------------------------------------------------------------------------------------------------------
# the same, as a person sees it: real subprocesses, no traceback, nothing on disk

def bad_labels_npz(path):
    return make_npz(path, n_train=20, n_test=10, y_test=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12]),
                    classes=np.array([f"c{i}" for i in range(10)]))


@pytest.mark.parametrize("case", ["beta 0", "unknown dataset", "labels out of range"])
def test_cli_bad_input_subprocess(tmp_path, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad_npz = bad_labels_npz(inputs / "bad.npz")
    extra, message = {
        "beta 0": (["--beta", "0", "--dataset", bad_npz], "--beta must be > 0, got 0.0"),
        "unknown dataset": (["--dataset", "mnsit"], "unknown --dataset 'mnsit': use mnist, cifar10, or a path"),
        "labels out of range": (["--dataset", bad_npz], f"{bad_npz}: labels must lie in 0..9, found 0..12"),
    }[case]
    # no --out: the default runs/<name> would be made in the working directory; nothing must appear there
    r = run_cli(["--preset", "micro", *extra], cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert r.stdout == ""
    assert message in one_error_line(r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


# ----------------------------------------------------------------------------------------------------------
# checkpoints: other settings, damage, an --out that cannot be written

def test_checkpoint_from_other_settings_names_what_differs(done, tmp_path, capsys):
    out, args = copy_of(done, tmp_path)
    before = snapshot(out)
    code, stdout, err = run_main(args + ["--codebook-size", "16"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"{out / 'tokenizer.pt'} was made with other settings (codebook_size: 32 -> 16)" in line
    assert "--retrain tokenizer" in line and "another --out" in line

    (tmp_path / "other").mkdir()  # other images under the same file name: the data fingerprint differs
    other = make_npz(tmp_path / "other" / "gen.npz", seed=1)
    code, stdout, err = run_main([a if a != args[args.index("--dataset") + 1] else other for a in args], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "tokenizer.pt was made with other settings (data: " in line and "--retrain tokenizer" in line

    code, stdout, err = run_main(args + ["--seed", "5"], capsys)
    assert code == 2 and "seed: 0 -> 5" in one_error_line(err)
    assert snapshot(out) == before


def test_changed_images_are_not_reported_up_to_date(done, tmp_path, capsys):
    """The data fingerprint hashed every 97th image and no test labels, so a dataset with images 1..96 changed
    (or other test labels) reused checkpoints trained on the old data without a word."""
    out, args = copy_of(done, tmp_path)
    with np.load(args[args.index("--dataset") + 1]) as f:
        a = {k: f[k] for k in f.files}
    a["x_train"] = a["x_train"].copy()
    a["x_train"][1:97] = 255 - a["x_train"][1:97]
    (tmp_path / "changed").mkdir()
    changed = str(tmp_path / "changed" / os.path.basename(args[args.index("--dataset") + 1]))  # the same name
    np.savez(changed, **a)
    code, stdout, err = run_main([x if x != args[args.index("--dataset") + 1] else changed for x in args], capsys)
    assert code == 2, "tokenizer.pt was reported up to date for other images"
    assert "data: " in one_error_line(err)


def damage(path, how):
    if how == "truncated":
        blob = path.read_bytes()
        path.write_bytes(blob[:len(blob) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(2048))
    else:  # a valid torch file that is not a checkpoint
        torch.save(torch.zeros(3), path)


DAMAGED = [(f, "truncated") for f in STAGES] + [("gpt.pt", "garbage"), ("gpt.pt", "not a checkpoint")]


@pytest.mark.parametrize("file,how", DAMAGED, ids=[f"{f} {h}" for f, h in DAMAGED])
def test_damaged_checkpoint_names_the_file_and_the_retrain_that_fixes_it(done, tmp_path, capsys, file, how):
    out, args = copy_of(done, tmp_path)
    damage(out / file, how)
    code, stdout, err = run_main(args, capsys)
    assert code == 2
    line = one_error_line(err)
    assert str(out / file) in line and "--retrain" in line
    stage = line.split("--retrain ")[1].split()[0].strip(",.;:)")
    # the way out that the message gives works
    code, stdout, err = run_main(args + ["--retrain", stage], capsys)
    assert code == 0, f"following the advice '--retrain {stage}' fails: {err.strip().splitlines()[-1]}"
    assert "model" in torch.load(out / file, weights_only=True) or file == "tokens.pt"
    assert torch.load(out / file, weights_only=True)["config"]


def test_unwritable_out_is_one_line_and_changes_nothing(done, tmp_path, capsys):
    data = done[1][done[1].index("--dataset") + 1]
    regular = tmp_path / "a_file"
    regular.write_text("keep me")
    for out, why in [(regular / "sub", "Not a directory"), (regular, "File exists")]:
        code, stdout, err = run_main(["--preset", "micro", "--dataset", data, "--out", str(out)], capsys)
        assert code == 2
        line = one_error_line(err)
        assert f"--out {out} is not a writable folder ({why})" in line
    assert regular.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["a_file"]


# ----------------------------------------------------------------------------------------------------------
# atomic writes

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    minicca.save_checkpoint({"w": torch.arange(5.0), "id": "old"}, path)
    good = (tmp_path / "ckpt.pt").read_bytes()
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    real_save = torch.save
    written = []

    def dies_midway(obj, f, *a, **k):
        """Write the first half of the real bytes where asked, then fail (disk full, kill, power cut)."""
        real_save(obj, str(tmp_path / "scratch"))
        blob = (tmp_path / "scratch").read_bytes()
        os.remove(tmp_path / "scratch")
        with open(f, "wb") as fh:
            fh.write(blob[:len(blob) // 2])
        written.append(f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        minicca.save_checkpoint({"w": torch.arange(1000.0), "id": "new"}, path)
    assert written and written[0] != path  # it wrote somewhere else first
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    assert torch.load(path, weights_only=True)["id"] == "old"
    fresh = str(tmp_path / "fresh.pt")
    with pytest.raises(OSError):
        minicca.save_checkpoint({"id": "new"}, fresh)
    assert not os.path.exists(fresh)  # a failed first save leaves no half file under the real name

    monkeypatch.setattr(torch, "save", real_save)
    minicca.save_checkpoint({"w": torch.arange(7.0), "id": "newer"}, path)  # over a stale temporary file
    assert torch.load(path, weights_only=True)["id"] == "newer"
    assert sorted(f for f in os.listdir(tmp_path) if not f.endswith(".tmp")) == ["ckpt.pt"]


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C and --resume

def test_resume_after_sigint_gives_the_weights_of_an_uninterrupted_run(data, tmp_path, capsys):
    common = ["--preset", "micro", "--device", "cpu", "--dataset", data, "--no-cca", "--no-eval",
              "--steps", "200", "--save-every", "5"]
    ref, interrupted = tmp_path / "ref", tmp_path / "interrupted"
    code, stdout, err = run_main(common + ["--out", str(ref)], capsys)
    assert code == 0, err[-1500:]
    interrupted.mkdir()
    for f in ["tokenizer.pt", "tokens.pt"]:  # same seed and data: the subprocess goes straight to pretraining
        shutil.copy(ref / f, interrupted / f)

    partial = interrupted / "gpt.pt.partial"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, SCRIPT, *common, "--out", str(interrupted)], stdout=so, stderr=se,
                                env=ENV, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not partial.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        appeared = partial.exists()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert appeared, f"no partial checkpoint appeared (exit {proc.returncode})\n{stderr[-2000:]}"
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert "[tokenizer] up to date" in stdout
    assert not (interrupted / "gpt.pt").exists()  # the first run did not finish
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("minicca: error: [pretrain] interrupted") and "--resume" in last
    assert str(partial) in last
    saved = torch.load(partial, weights_only=True)
    assert 5 <= saved["step"] < 200 and len(saved["history"]) == saved["step"]

    code, stdout, err = run_main(common + ["--out", str(interrupted), "--resume"], capsys)
    assert code == 0, err[-1500:]
    assert f"[pretrain] resuming from step {saved['step']}/200 ({partial})" in stdout
    assert not partial.exists()  # consumed
    a = torch.load(ref / "gpt.pt", weights_only=True)
    b = torch.load(interrupted / "gpt.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["step"] for h in b["history"]] == list(range(200))
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


@pytest.fixture
def fake_ctrl_c(monkeypatch):
    """Ctrl-C in-process at pretraining step 12 (raised where the learning rate for that step is set; the
    tokenizer's schedule, also a cosine_lr, is left alone: the runs below pretrain for 30 steps, it has 40)."""
    real = minicca.cosine_lr

    def cosine_lr(base, steps, *a, **k):
        lr = real(base, steps, *a, **k)
        if steps != 30:
            return lr

        def at(step):
            if step == 12:
                raise KeyboardInterrupt
            return lr(step)
        return at
    monkeypatch.setattr(minicca, "cosine_lr", cosine_lr)
    return lambda: monkeypatch.setattr(minicca, "cosine_lr", real)


def interrupted_run(data, tmp_path, capsys, fake_ctrl_c, save_every="5"):
    out = tmp_path / "out"
    args = ["--preset", "micro", "--device", "cpu", "--dataset", data, "--no-cca", "--no-eval", "--steps", "30",
            "--save-every", save_every, "--out", str(out)]
    code, stdout, err = run_main(args, capsys)
    fake_ctrl_c()  # back to the real schedule
    assert code == 130  # Ctrl-C: the conventional 128 + SIGINT
    line = last_line(err)  # after the progress bars
    assert "[pretrain] interrupted" in line and "--resume" in line
    return out, args


def test_ctrl_c_saves_where_it_stopped(data, tmp_path, capsys, fake_ctrl_c):
    out, args = interrupted_run(data, tmp_path, capsys, fake_ctrl_c, save_every="0")  # no periodic saves
    state = torch.load(out / "gpt.pt.partial", weights_only=True)
    assert state["step"] == 12 and len(state["history"]) == 12 and not (out / "gpt.pt").exists()


def test_without_resume_a_partial_is_ignored_with_a_note(data, tmp_path, capsys, fake_ctrl_c):
    out, args = interrupted_run(data, tmp_path, capsys, fake_ctrl_c)
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err[-1500:]
    assert f"[pretrain] note: {out / 'gpt.pt.partial'} holds an interrupted run; pass --resume" in stdout
    assert "resuming" not in stdout
    hist = torch.load(out / "gpt.pt", weights_only=True)["history"]
    assert [h["step"] for h in hist] == list(range(30))  # started over from step 0
    assert not (out / "gpt.pt.partial").exists()


def test_resume_with_other_settings_names_them_and_the_advice_works(data, tmp_path, capsys, fake_ctrl_c):
    out, args = interrupted_run(data, tmp_path, capsys, fake_ctrl_c)
    code, stdout, err = run_main(args + ["--resume", "--steps", "31"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"{out / 'gpt.pt.partial'} was made with other settings (steps: 30 -> 31)" in line
    # follow the advice on the same command line: it must get the user out, not repeat the same error
    advice = line.split("pass ")[1].split(" to redo")[0] if "pass --retrain" in line else None
    if advice:
        code, stdout, err = run_main(args + ["--resume", "--steps", "31", *advice.split()], capsys)
        assert code == 0, f"following the advice {advice!r} fails again: {err.strip()[-400:]}"


def test_resume_with_a_damaged_partial_names_it_and_the_advice_works(data, tmp_path, capsys, fake_ctrl_c):
    out, args = interrupted_run(data, tmp_path, capsys, fake_ctrl_c)
    damage(out / "gpt.pt.partial", "truncated")
    code, stdout, err = run_main(args + ["--resume"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert str(out / "gpt.pt.partial") in line and "unreadable" in line
    if "--retrain" in line:
        stage = line.split("--retrain ")[1].split()[0].strip(",.;:)")
        code, stdout, err = run_main(args + ["--resume", "--retrain", stage], capsys)
        assert code == 0, f"following the advice '--retrain {stage}' fails again: {err.strip()[-400:]}"


# ----------------------------------------------------------------------------------------------------------
# a non-finite loss

def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(done, tmp_path, capsys):
    out, args = copy_of(done, tmp_path)
    before = snapshot(out)
    code, stdout, err = run_main(args + ["--retrain", "pretrain", "--lr", "1e30", "--save-every", "1"], capsys)
    assert code == 2
    line = last_line(err)
    assert line.startswith("minicca: error: [pretrain] non-finite loss at step ")
    step = int(line.split("at step ")[1].split(";")[0])
    assert 0 <= step < 40 and f"last good checkpoint kept ({out / 'gpt.pt.partial'})" in line
    assert "Traceback" not in err
    state = torch.load(out / "gpt.pt.partial", weights_only=True)
    assert state["step"] == step and all(torch.isfinite(v).all() for v in state["model"].values())
    assert snapshot(out) == {**before, "gpt.pt.partial": (out / "gpt.pt.partial").read_bytes()}  # rest untouched

    os.remove(out / "gpt.pt.partial")  # without periodic saves there is nothing to keep, and it says so
    code, stdout, err = run_main(args + ["--retrain", "pretrain", "--lr", "1e30"], capsys)
    assert code == 2 and "(no partial checkpoint yet)" in last_line(err)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------
# reproducibility

def test_same_seed_same_tokens_images_and_metrics(done, tmp_path, capsys):
    """A subprocess run against the in-process one of the `done` fixture: two processes, two --out folders."""
    ref, args = done
    out = tmp_path / "again"
    r = run_cli([a if a != str(ref) else str(out) for a in args], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(d / "tokens.pt", weights_only=True) for d in (ref, out))
    assert torch.equal(a["train"], b["train"]) and torch.equal(a["test"], b["test"])
    for f in ["tokenizer_recon.png", "samples_base.png", f"samples_base_cfg{minicca.COMMON['cfg']:g}.png"]:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f
    for f in ["gpt.pt", CCA_FILE, "classifier.pt"]:
        ma, mb = (torch.load(d / f, weights_only=True)["model"] for d in (ref, out))
        assert all(torch.equal(ma[k], mb[k]) for k in ma), f
    ra, rb = (json.loads((d / "metrics.json").read_text())["rows"] for d in (ref, out))
    assert ra.keys() == rb.keys()
    for name in ra:
        drop = lambda r: {k: v for k, v in r.items() if not k.startswith("sec_per_image")}  # noqa: E731 (timings)
        assert drop(ra[name]) == drop(rb[name]), name

    other = tmp_path / "seed1"  # and the seed matters
    code, stdout, err = run_main([a if a != str(ref) else str(other) for a in args] + ["--seed", "1", "--no-cca",
                                                                                       "--no-eval"], capsys)
    assert code == 0
    assert not torch.equal(torch.load(other / "tokens.pt", weights_only=True)["train"], a["train"])
    assert (other / "samples_base.png").read_bytes() != (ref / "samples_base.png").read_bytes()
