"""Helpers for the course notebooks: the setup behind one call, plotting and loading helpers, and
the exercise checkers. It imports minicca, never re-implements it, and holds no solutions (those
are in notebooks/instructor/). Every checker is `check_<name>(answer, verbose=True) -> bool`: True
when the answer is accepted; otherwise it prints the mistake it recognises and returns False.
"""
import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from types import SimpleNamespace

NOTEBOOKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(NOTEBOOKS_DIR)
if REPO_DIR not in sys.path:  # the minicca.py next to notebooks/, whatever the working directory
    sys.path.insert(0, REPO_DIR)

import matplotlib.pyplot as plt  # noqa: E402 (after the path is set, like minicca)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.utils  # noqa: E402

import minicca  # noqa: E402

QUICK = os.environ.get("MINICCA_QUICK") == "1"  # set by tests/test_notebooks.py: less of everything
DEVICE = torch.device("cpu")
SWEEP_FILE = os.path.join(REPO_DIR, "tiny_data", "sweep_tiny.json")
RESULTS_FILE = os.path.join(REPO_DIR, "docs", "results.md")


# ---------------------------------------------------------------------------------------------
# Setup

def start():
    """Everything a notebook's first cell needs; prints the two lines the notebook test reads and
    returns QUICK (MINICCA_QUICK=1: fewer samples, shorter fine-tunes, coarser grids)."""
    # tiny models: on a busy 2-core machine two threads ran several times slower than one
    torch.set_num_threads(int(os.environ.get("MINICCA_THREADS", "1")))
    # tqdm bars become widgets in a notebook and bloat the saved file; stages still print a line
    if hasattr(minicca, "tqdm") and not isinstance(minicca.tqdm, functools.partial):
        minicca.tqdm = functools.partial(minicca.tqdm, disable=True)
    plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
    print(f"quick mode: {QUICK}")
    with open(minicca.__file__, "rb") as f:  # the notebook test compares it with today's file
        print(f"minicca.py sha256: {hashlib.sha256(f.read()).hexdigest()[:16]}")
    return QUICK


def claims(models):
    """Whether cells assert the prose's claims about their numbers: in a full run on the reference
    models (cpu preset). In quick mode or on micro models the numbers are noise: print only."""
    return models.preset == "cpu" and not QUICK


def load_models(judge=False):
    """Tokenizer, base GPT and the default CCA fine-tune (and the shipped judge), as a namespace:
    from tiny_data/pretrained (or MINICCA_PRETRAINED), else trained by the pipeline into a
    temporary folder (the micro preset in quick mode, cpu otherwise)."""
    pretrained = os.environ.get("MINICCA_PRETRAINED", minicca.PRETRAINED)

    def cca_file(preset):  # the file name the pipeline gives a preset's default fine-tune
        return minicca.cca_name({**minicca.COMMON, **minicca.PRESETS[preset]}) + ".pt"
    found = [p for p in ("cpu", "micro") if all(os.path.isfile(os.path.join(pretrained, f))
                                                for f in ["tokenizer.pt", "gpt.pt", cca_file(p)])]
    if found:
        ckpt_dir, preset = pretrained, found[0]
    else:
        preset = "micro" if QUICK else "cpu"
        ckpt_dir = tempfile.mkdtemp(prefix="minicca_run_")
        print(f"no reference checkpoints in {pretrained}: "
              f"training them with --preset {preset} into {ckpt_dir}")
        started = time.time()
        with contextlib.redirect_stdout(io.StringIO()):  # a line per stage; one summary suffices
            minicca.main(["--out", ckpt_dir, "--preset", preset, "--device", "cpu", "--no-eval"])
        print(f"trained in {time.time() - started:.0f} s; "
              f"to reuse them, set MINICCA_PRETRAINED={ckpt_dir}")
    tk, gk, ck = (minicca.load_checkpoint(os.path.join(ckpt_dir, f))
                  for f in ("tokenizer.pt", "gpt.pt", cca_file(preset)))
    assert gk["config"]["tokenizer"] == tk["id"] and ck["config"]["base"] == gk["id"], \
        "checkpoints of different runs"
    tokenizer = minicca.VQTokenizer(minicca.VQConfig(**tk["vq_config"])).eval()
    tokenizer.load_state_dict(tk["model"])  # casts the float16 weights to float32
    data = minicca.load_dataset(None)  # None: the MNIST subset shipped in tiny_data/
    height, width = data["x_train"].shape[1:3]
    models = SimpleNamespace(
        tk=tk, gk=gk, ck=ck, tokenizer=tokenizer, base=minicca.load_gpt(gk, DEVICE),
        cca=minicca.load_gpt(ck, DEVICE), preset=preset, ckpt_dir=ckpt_dir, data=data,
        shipped=os.path.realpath(ckpt_dir) == os.path.realpath(minicca.PRETRAINED),
        P={**minicca.COMMON, **minicca.PRESETS[preset]},  # the settings they were made with
        K=len(data["classes"]), grid=(height // 4, width // 4))  # the tokenizer downsamples 4x
    if judge:
        models.classifier = minicca.load_judge("mnist", DEVICE)
    return models


def load_sweep(models, quick_flags):
    """The sweeps of `python minicca.py --sweep` (sweep.json): tiny_data/sweep_tiny.json when made
    from these checkpoints, else (or with MINICCA_RECOMPUTE_SWEEP=1) recomputed by the pipeline,
    with `quick_flags` in quick mode. Returns (sweep, where it came from)."""
    if os.environ.get("MINICCA_RECOMPUTE_SWEEP") != "1" and os.path.isfile(SWEEP_FILE):
        with open(SWEEP_FILE) as f:
            sweep = json.load(f)
        if sweep.get("base") == models.gk["id"]:
            return sweep, os.path.relpath(SWEEP_FILE, REPO_DIR)
    out = tempfile.mkdtemp(prefix="minicca_sweep_")
    flags = ["--pretrained"] if models.shipped else ["--preset", models.preset]
    flags += ["--out", out, "--sweep", "--no-cca", "--no-eval", "--device", "cpu"]
    flags += quick_flags + ["--eval-seeds", "1"] if QUICK else []
    if not models.shipped:  # link the checkpoints trained above: the pipeline finds them up to date
        for f in os.listdir(models.ckpt_dir):
            if f.endswith(".pt"):
                os.symlink(os.path.join(models.ckpt_dir, f), os.path.join(out, f))
    print("recomputing the sweep: python minicca.py " + " ".join(flags))
    with contextlib.redirect_stdout(io.StringIO()):
        minicca.main(flags)
    with open(os.path.join(out, "sweep.json")) as f:
        return json.load(f), "recomputed: " + os.path.join(out, "sweep.json")


def finetune(models, tokens, labels, loss="cca", lam=10.0, epochs=0.3, seed=1):
    """minicca.finetune_cca from the base model with its settings, but another loss, λ or length.
    Returns (model, history: the loss and cca_loss's statistics per step)."""
    settings = {**models.P, "loss": loss, "lam": lam, "cca_epochs": epochs}
    made = minicca.finetune_cca(models.base, tokens, labels, settings, seed, DEVICE)
    model = copy.deepcopy(models.base)
    model.load_state_dict(made["model"])
    return model.eval(), made["history"]


# ---------------------------------------------------------------------------------------------
# Figures and tables

def show_grids(panels, nrow, title, per_row=4):
    """Image grids, `per_row` titled panels to a row: {title: images (B, C, H, W) in [0, 1]}."""
    cols = min(len(panels), per_row)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, images) in zip(axes.flat, panels.items()):
        grid = torchvision.utils.make_grid(images.float().cpu(), nrow=nrow, padding=1,
                                           pad_value=0.5)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(textwrap.fill(name, 34), fontsize=9)
    fig.suptitle(title, fontsize=10)
    plt.tight_layout()
    plt.show()


def label_points(ax, xs, ys, texts, fontsize=7):
    """Label points, alternating above-right and below-left so that neighbours rarely overlap."""
    for k, (x, y, text) in enumerate(zip(xs, ys, texts)):
        dx, dy = (4, 4) if k % 2 == 0 else (-4, -11)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                    fontsize=fontsize, ha="left" if dx > 0 else "right")


def results_table(heading):
    """The first table under a docs/results.md heading as {first cell: {column: value}} ("mean ±
    std" gives column and column_std): notebooks print it from the file, so they cannot drift."""
    with open(RESULTS_FILE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start_at = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows = []
    for line in lines[start_at + 1:]:
        if line.startswith("#") or (rows and not line.startswith("|")):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]  # rows[1] is the |---| line
    table = {}
    for row in body:
        values = {}
        for column, cell in zip(header[1:], row[1:]):
            mean, _, std = cell.partition("±")
            values[column] = float(mean)
            if std:
                values[column + "_std"] = float(std)
        table[row[0]] = values
    return table


# ---------------------------------------------------------------------------------------------
# Exercise checkers: a number, or a function where the exercise asks for one

def _verdict(mistake, verbose):
    if verbose:
        print("accepted" if mistake is None else f"MISTAKE: {mistake}")
    return mistake is None


def _number(answer, right, slips, verbose, tol):  # a number against the right one and slips
    if answer is None:
        return _verdict("not answered yet: replace None by your prediction", verbose)
    for name, value in [(None, right)] + slips:
        if abs(float(answer) - value) <= tol:
            return _verdict(name, verbose)
    return _verdict(f"{float(answer):.4g} is not what the theory gives, nor a slip this checker "
                    "knows: redo the derivation step by step", verbose)


def _function(fn, args, right, slips, verbose):  # fn(*args) against the right array and slips
    if fn is None:
        return _verdict("not answered yet: replace None by your function", verbose)
    try:
        out = np.asarray(fn(*args), dtype=float)
    except NotImplementedError:
        return _verdict("not answered yet: fill in the function, then run the cell again", verbose)
    right = np.asarray(right, dtype=float)
    if out.shape != right.shape:
        return _verdict(f"shape {out.shape}, expected {right.shape}", verbose)
    for name, value in [(None, right)] + slips:
        if np.allclose(out, np.reshape(value, right.shape), rtol=0, atol=1e-4):
            return _verdict(name, verbose)
    return _verdict("wrong values, and not a slip this checker knows: test it on a toy you can "
                    "work out by hand", verbose)


# The checkers hold the expected values of their fixed cases as numbers, rounded (computed once
# by the instructor's solutions), never the way to compute them.

def check_cfg_cost(answer, verbose=True):
    """00: rows through the model per sampling step, CFG at w = 3 against guidance-free."""
    slips = [("the null-class pass is forgotten: CFG needs the unconditional logits for the same "
              "prefix at every step", 1.0),
             ("the cost does not grow with w: w only mixes the two passes' logits", 3.0),
             ("inverted: the question is CFG's cost in units of guidance-free sampling", 0.5)]
    return _number(answer, 2.0, slips, verbose, 0.01)


def check_step0_loss(answer, verbose=True):
    """00: the expected cca_loss at step 0 with λ = 10, uncond_ratio u = 0.1, K = 10 balanced
    classes, collisions as positives, the official division by max(λ, 1)."""
    slips = [("every row weighted by λ: flagged rows (null rows, collisions) weigh 1", 0.76246),
             ("collisions forgotten: a rolled label equals the true one about 1 time in K",
              0.70008),
             ("collisions counted on the null rows too: a null row cannot collide", 0.63770),
             ("flagged rows left out: they stay in the mean as positives, each adding log 2",
              0.63076),
             ("no normalisation: the official total is divided by max(λ, 1)", 6.43934)]
    return _number(answer, 0.64393, slips, verbose, 0.002)


def check_lam_star(answer, verbose=True):
    """01: λ*_2(c) of class 0 in the two-image world: p(x|0) = (3/4, 1/4), p(x) = (1/2, 1/2)."""
    slips = [("that is Z_s(c) itself, the tilted mass; λ* is the λ with λ^s = Z_s(c)", 1.75),
             ("that is log λ*, the Rényi divergence D_(1+s); λ* = exp D", 0.279807),
             ("p(x|c)^s: the tilt multiplies p(x|c) by the ratio to the power s, so the "
              "exponent of p(x|c) is 1 + s", 1.581139),
             ("the power 1/(1 + s): the mass is divided by λ^s, so take the power 1/s", 1.205071),
             ("that is λ*_1, at s = 1; the question is s = 2", 1.25)]
    return _number(answer, 1.322876, slips, verbose, 0.002)


# 01, Exercise 7.2: a toy with unequal classes, counts (X = 4 images, K = 3 classes), and λ
MASK_TOY = np.array([[9, 2, 1], [3, 5, 1], [6, 1, 4], [2, 4, 7]], dtype=float)
MASK_LAM = 3.0
MASK_RIGHT = [0.223144, -1.696449, -2.595721, -1.568616, 0.136132, -2.277267,
              -0.693147, -2.389596, -0.757442, -2.580217, -0.897942, -0.043675]


def check_r_star_mask(answer, verbose=True):
    """01: a function (p_x_given_c (X, K), p_x (X,), p_c (K,), lam) -> the optimal score r*(x, c)
    (X, K) when colliding rows are dropped (collisions="mask")."""
    p_xc = MASK_TOY / MASK_TOY.sum()
    args = (p_xc / p_xc.sum(0), p_xc.sum(1), p_xc.sum(0), MASK_LAM)
    slips = [("the positive rule's shift: with mask a colliding row loses its positive term too, "
              "not only its negative",
              [1.178655, -1.149906, -2.001014, -0.613104, 0.682676, -1.68256,
               0.262364, -1.843053, -0.162734, -1.624705, -0.351398, 0.551032]),
             ("only the negative dropped: a masked row loses its positive term as well",
              [0.376913, -1.820311, -2.688811, -1.414846, 0.01227, -2.370358,
               -0.539378, -2.513459, -0.850532, -2.426447, -1.021804, -0.136765]),
             ("only the negative dropped, and the kept rows' mean taken over all rows",
              [0.81093, -1.386294, -2.254794, -0.980829, 0.446287, -1.936341,
               -0.105361, -2.079442, -0.416515, -1.99243, -0.587787, 0.297252]),
             ("no shift: that is §2's optimum, collisions counted as ordinary negatives",
              [-0.575364, -1.568616, -2.341806, -1.386294, -0.364643, -2.054124,
               -0.893818, -2.174752, -0.8685, -2.159484, -0.955511, -0.475938]),
             ("the -log λ is missing",
              [0.523248, -0.470004, -1.243194, -0.287682, 0.733969, -0.955511,
               0.204794, -1.076139, 0.230112, -1.060872, 0.143101, 0.622674])]
    return _function(answer, args, np.reshape(MASK_RIGHT, (4, 3)), slips, verbose)


def check_balance_point(answer, verbose=True):
    """02: the gap⁻ (nats) at which the push on a wrong pair equals the pull on a true pair at
    gap⁺ = 0, for β = 0.1 and λ = 100. Accepted within 0.1 nats."""
    slips = [("the pull at gap⁺ = 0 is β·σ(0) = β/2, not β", -46.052),
             ("β dropped: the sigmoid's argument is β·gap, so divide by β", -5.293),
             ("sign: the wrong pairs are pushed down, so the balance point lies below 0", 52.933)]
    return _number(answer, -52.933, slips, verbose, 0.1)


def check_separable_lambda(answer, verbose=True):
    """02: λ*_1(c) = E_{x~p(.|c)}[p(c|x)/p(c)] for K = 10 balanced classes when the data's Bayes
    classifier puts every image of class c in c with certainty."""
    slips = [("λ* = 1 would mean p(c|x) = p(c): a certain classifier gives p(c|x) = 1", 1.0),
             ("that is log λ*, the Rényi divergence; λ* = exp D", 2.302585),
             ("that is p(c), the prior; the ratio is p(c|x)/p(c)", 0.1),
             ("the power 1 + s without the root 1/s: λ*^s = E[ratio^s], so λ* = E[ratio^s]^(1/s)",
              100.0)]
    return _number(answer, 10.0, slips, verbose, 0.01)


# ---- 03_porting checkers ----
NOISE_NAMES = {  # sha256(attribute name)[:12] of each right answer, and the mistake of missing it
    "30466c077727": "missed drop path, a module that drops whole residual branches (no nn.Dropout)",
    "440ad4a10948": "missed the attention-dropout float, handed to SDPA as dropout_p",
    "60ea43de626d": "missed label dropout, inside the class embedder"}


def check_remaining_noise(answer, verbose=True):
    """03: the attribute names still injecting noise into the stand-in once every nn.Dropout's p
    is 0 (the names no_randomness reports)."""
    if answer is None:
        return _verdict("not answered yet: replace None by a set of attribute names", verbose)
    digests = {hashlib.sha256(str(name).encode()).hexdigest()[:12]: name for name in answer}
    mistakes = ["listed p: every nn.Dropout's p is already 0"] if "p" in answer else []
    mistakes += [mistake for digest, mistake in NOISE_NAMES.items() if digest not in digests]
    extra = sorted(name for digest, name in digests.items()
                   if digest not in NOISE_NAMES and name != "p")
    if extra:
        mistakes.append(f"{extra} inject no noise in the stand-in")
    return _verdict(mistakes[0] if mistakes else None, verbose)


def check_official_accuracy_bound(answer, verbose=True):
    """03: answer(rows, flagged) -> the largest reward accuracy averaged over all rows, as the
    official scripts log it, when `flagged` of the `rows` are flagged and randomness is off."""
    cases = [(512, 80), (64, 0), (2, 2), (10, 3)]
    slips = [("1.0: a flagged row has equal gaps on both branches, so it never wins", [1.0] * 4),
             ("the flagged share: it is the unflagged rows that can win",
              [0.15625, 0.0, 1.0, 0.3]),
             ("1 - uncond_ratio: collisions are flagged too; use the flagged count given",
              [0.9] * 4)]
    fn = None if answer is None else lambda: [float(answer(*case)) for case in cases]
    return _function(fn, (), [0.84375, 1.0, 0.0, 0.7], slips, verbose)


class TinyNextTokenModel(torch.nn.Module):
    """03, 'wire the log-likelihood': forward(tokens, labels) returns {"logits": (B, N, V)}, where
    logits[:, i] predicts tokens[:, i + 1] (the last is unused); first_logits(labels) -> (B, V)
    predicts tokens[:, 0]."""

    def __init__(self, vocab=7, num_classes=3, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.cls = torch.nn.Parameter(torch.randn(num_classes + 1, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def first_logits(self, labels):
        return self.cls[labels] @ self.out                                  # (B, V)

    def forward(self, tokens, labels):
        h = self.tok[tokens].cumsum(1) + self.cls[labels][:, None]          # (B, N, D)
        return {"logits": h @ self.out, "loss": torch.tensor(0.0)}


def check_wire_logp(answer, verbose=True):
    """03: answer(model) -> callable (tokens, labels) -> (B,) sequence log-likelihoods for
    TinyNextTokenModel."""
    if answer is None:
        return _verdict("not answered yet: replace None by your adapter", verbose)
    model = TinyNextTokenModel(seed=1)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 7, (5, 6), generator=g)
    labels = torch.randint(0, 4, (5,), generator=g)
    try:
        got = answer(model)(tokens, labels)
    except NotImplementedError:
        return _verdict("not answered yet: fill in the adapter, then run the cell again", verbose)
    except Exception as error:  # noqa: BLE001  (report it as the mistake)
        return _verdict(f"it raised {type(error).__name__}: {error}", verbose)
    if not torch.is_tensor(got) or got.shape != (5,):
        shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        return _verdict(f"returned {shape}, not (B,): sum the token log-probabilities per "
                        "sequence", verbose)
    slips = [("off by one: logits[:, i] predicts tokens[:, i + 1] in this model",
              [-35.986, -29.2857, -25.6532, -44.4015, -68.8211]),
             ("left out the first token (model.first_logits predicts it)",
              [-33.118, -28.776, -26.7563, -45.6372, -53.1684])]
    for mistake, value in [(None, [-33.512, -29.4889, -27.4692, -45.886, -55.5648])] + slips:
        if torch.allclose(got.detach().double(), torch.tensor(value).double(), atol=1e-3):
            return _verdict(mistake, verbose)
    return _verdict("not the sum over the N tokens of log p(x_i | c, x_<i)", verbose)
