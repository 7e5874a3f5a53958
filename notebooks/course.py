"""Helpers for the course notebooks: shared setup (00 and 02) and exercise checkers (01, 02).

Notebooks import this module from notebooks/ (their working directory); it imports minicca, never
re-implements it.
"""

# ----------------------------------------------------------------------------------------------------------
# Shared setup (00_tour, 02_tradeoff)
# A notebook's first cell runs `import course` and `course.start()`; the rest of the setup
# (finding minicca.py, loading the shipped checkpoints or training them, the judge) lives here once.
import contextlib
import copy
import functools
import glob
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from types import SimpleNamespace

NOTEBOOKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(NOTEBOOKS_DIR)
if REPO_DIR not in sys.path:  # the minicca.py next to notebooks/, whatever the working directory
    sys.path.insert(0, REPO_DIR)

import matplotlib.pyplot as plt  # noqa: E402 (after the path is set, like minicca)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import minicca  # noqa: E402

QUICK = os.environ.get("MINICCA_QUICK") == "1"  # set by tests/test_notebooks.py: less of everything
DEVICE = torch.device("cpu")
SWEEP_FILE = os.path.join(os.path.dirname(minicca.TINY_DATA), "sweep_tiny.json")


def minicca_sha256():
    """The first 16 hex digits of the sha256 of the imported minicca.py: the notebook test compares
    the value a notebook printed when its outputs were made with today's file."""
    with open(minicca.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def start():
    """Everything a notebook's first cell needs; prints the two lines the notebook test reads."""
    # The models are tiny: on a 2-core machine busy with other work, two threads ran several
    # times slower than one. On a free machine with more cores MINICCA_THREADS=4 may help.
    torch.set_num_threads(int(os.environ.get("MINICCA_THREADS", "1")))
    # tqdm bars become widgets in a notebook and bloat the saved file; stages still print a line
    if hasattr(minicca, "tqdm") and not isinstance(minicca.tqdm, functools.partial):
        minicca.tqdm = functools.partial(minicca.tqdm, disable=True)
    plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
    print(f"quick mode: {QUICK}")
    print(f"minicca.py sha256: {minicca_sha256()}")
    return QUICK


def cca_file(preset):
    """The file name the pipeline gives the default CCA fine-tune of a preset."""
    return minicca.cca_name({**minicca.COMMON, **minicca.PRESETS[preset]}) + ".pt"


def has_shipped_judge():
    return hasattr(minicca, "load_judge")


def load_judge(ckpt_dir):
    """The classifier that scores samples: minicca.load_judge('mnist') when minicca ships one,
    else the classifier.pt that the pipeline trained next to the checkpoints.
    Returns (classifier in eval mode, where it came from)."""
    if has_shipped_judge():
        return minicca.load_judge("mnist").to(DEVICE).eval(), "minicca.load_judge('mnist')"
    path = os.path.join(ckpt_dir, "classifier.pt")
    ckpt = minicca.load_checkpoint(path)
    data = minicca.load_dataset(None)
    classifier = minicca.Classifier(data["x_train"].shape[-1], len(data["classes"]),
                                    ckpt["config"]["clf_width"])
    classifier.load_state_dict(ckpt["model"])
    return classifier.eval(), path


def load_models(judge=False):
    """Tokenizer, base GPT and the default CCA fine-tune (and the judge), as a namespace.

    From tiny_data/pretrained (or MINICCA_PRETRAINED) when the files are there; otherwise the
    pipeline trains them into a temporary folder, never into the repository: the micro preset in
    quick mode, cpu otherwise."""
    pretrained = os.environ.get("MINICCA_PRETRAINED", minicca.PRETRAINED)
    needed = ["tokenizer.pt", "gpt.pt"]
    if judge and not has_shipped_judge():
        needed.append("classifier.pt")
    found = [p for p in ("cpu", "micro")
             if all(os.path.isfile(os.path.join(pretrained, f)) for f in needed + [cca_file(p)])]
    if found:
        ckpt_dir, preset = pretrained, found[0]
    else:
        preset = "micro" if QUICK else "cpu"
        ckpt_dir = tempfile.mkdtemp(prefix="minicca_run_")
        print(f"no reference checkpoints in {pretrained}: "
              f"training them with --preset {preset} into {ckpt_dir}")
        started = time.time()
        flags = ["--out", ckpt_dir, "--preset", preset, "--device", "cpu"]
        if judge and not has_shipped_judge():  # evaluation trains the judge: keep it cheap
            flags += ["--eval-samples", "100"]
        else:
            flags += ["--no-eval"]
        with contextlib.redirect_stdout(io.StringIO()):  # a line per stage; one summary suffices
            minicca.main(flags)
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
        models.classifier, models.judge_source = load_judge(ckpt_dir)
    return models


def encode(models, images, batch=1000):
    """uint8 NHWC images -> token sequences (n, N) with the tokenizer, in batches."""
    with torch.no_grad():
        return torch.cat([models.tokenizer.encode(minicca.to_float(images[i:i + batch])).flatten(1)
                          for i in range(0, len(images), batch)])


def show_grids(panels, nrow, title, per_row=4):
    """Image grids, `per_row` titled panels to a row: {title: images (B, C, H, W) in [0, 1]}."""
    import textwrap
    import torchvision.utils
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
    """Label points without overlaps: for each point try offsets around it and keep the first
    whose text box touches neither a placed label nor any point. Call after tight_layout (the
    boxes are measured in pixels)."""
    renderer = ax.figure.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([xs, ys]))
    offsets = [(4, 4), (4, -11), (-4, 4), (-4, -11), (8, 14), (-8, 14), (8, -20), (-8, -20),
               (14, -4), (-14, -4), (4, 24), (4, -30)]
    placed = []
    for x, y, text in zip(xs, ys, texts):
        for dx, dy in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                                fontsize=fontsize, ha="left" if dx >= 0 else "right")
            box = label.get_window_extent(renderer).expanded(1.1, 1.2)
            clear = not any(box.overlaps(other) for other in placed) and \
                not any(box.contains(px, py) for px, py in points)
            if clear or (dx, dy) == offsets[-1]:
                placed.append(box)
                break
            label.remove()


def readme_table(heading):
    """The first Markdown table under a README.md heading, as {first cell: {column: value}} (a
    "mean ± std" cell gives column = mean and column_std = std): notebooks print the README's
    measured numbers from the file itself, so they cannot drift."""
    with open(os.path.join(REPO_DIR, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start_at = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows = []
    for line in lines[start_at + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]  # rows[1] is the |---| line
    table = {}
    for row in body:
        values = {}
        for column, cell in zip(header[1:], row[1:]):
            try:  # "0.976 ± 0.010": the mean over sets of samples (the std is kept apart)
                mean, _, std = cell.partition("±")
                values[column] = float(mean)
                if std:
                    values[column + "_std"] = float(std)
            except ValueError:
                values[column] = cell
        table[row[0]] = values
    return table


def accepts_flag(flag):
    """Whether this minicca.py's command line has `flag` (taking one value)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            minicca.parse_args([flag, "1"])
        return True
    except SystemExit:
        return False


def load_sweep(models, quick_flags):
    """The CFG-scale and λ sweeps as `python minicca.py --sweep` writes them (sweep.json).

    The shipped full sweep, tiny_data/sweep_tiny.json (or the file MINICCA_SWEEP_JSON names),
    when it was made from these checkpoints; recomputed with the pipeline when
    MINICCA_RECOMPUTE_SWEEP=1, when the file is absent or when it belongs to other checkpoints
    (in quick mode with `quick_flags`). Returns (sweep, where it came from)."""
    source = os.environ.get("MINICCA_SWEEP_JSON", SWEEP_FILE)
    recompute = os.environ.get("MINICCA_RECOMPUTE_SWEEP") == "1"
    if not recompute and os.path.isfile(source):
        with open(source) as f:
            sweep = json.load(f)
        # newer files name their base model's id; older ones belong to the shipped checkpoints
        if sweep.get("base", models.gk["id"] if models.shipped else None) == models.gk["id"]:
            return sweep, source
    out = tempfile.mkdtemp(prefix="minicca_sweep_")
    start_from = ["--pretrained"] if models.shipped else ["--preset", models.preset]
    flags = start_from + ["--out", out, "--sweep", "--no-cca", "--no-eval", "--device", "cpu"]
    flags += quick_flags if QUICK else []
    if QUICK and accepts_flag("--eval-seeds"):  # one set of samples per point is enough for a check
        flags += ["--eval-seeds", "1"]
    if not models.shipped:  # link the checkpoints trained above: the pipeline finds them up to date
        for f in glob.glob(os.path.join(models.ckpt_dir, "*.pt")):
            os.symlink(f, os.path.join(out, os.path.basename(f)))
    print("recomputing the sweep: python minicca.py " + " ".join(flags))
    started = time.time()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        minicca.main(flags)
    print("\n".join(line for line in log.getvalue().splitlines() if line.startswith("[sweep]")))
    print(f"recomputed in {time.time() - started:.0f} s")
    with open(os.path.join(out, "sweep.json")) as f:
        return json.load(f), "recomputed: " + os.path.join(out, "sweep.json")


def finetune(models, tokens, labels, loss="cca", lam=10.0, epochs=0.3, seed=1):
    """A short fine-tune of the base model with the pipeline's recipe, around minicca's public
    cca_step_loss (the loss, its negatives, its logged statistics): a trainable copy against a
    frozen one, AdamW (0.9, 0.95) with weight decay 0.05 on matrices, a constant learning rate,
    gradients clipped at 1, a fresh shuffle per epoch. It skips the pipeline's caching and
    reports, which cost more than a few steps; `python minicca.py --pretrained --loss L --lam X
    --cca-epochs E` runs the same recipe. Returns (model, history: statistics per step)."""
    P = models.P
    policy = copy.deepcopy(models.base).eval()  # eval: no dropout, so every gap is 0 at step 0
    reference = copy.deepcopy(models.base).eval().requires_grad_(False)
    matrices = [p for p in policy.parameters() if p.dim() >= 2]
    others = [p for p in policy.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.05}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=P["cca_lr"], betas=(0.9, 0.95))
    batch = P["batch_size"]
    steps = max(math.ceil(epochs * len(tokens) / batch), 1)
    generator = torch.Generator().manual_seed(seed)
    order, history = torch.empty(0, dtype=torch.long), []
    for _ in range(steps):
        if len(order) < batch:  # a new epoch: a new permutation
            order = torch.randperm(len(tokens), generator=generator)
        rows, order = order[:batch], order[batch:]
        value, stats = minicca.cca_step_loss(
            policy, reference, tokens[rows].long(), labels[rows], loss, P["beta"], lam,
            P["uncond_ratio"], P["collisions"], generator)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        history.append({"loss": value.item(), **{k: float(v) for k, v in stats.items()}})
    return policy.eval(), history


class Scorer:
    """Scores a model as the pipeline's table does, with public minicca functions: `n` samples
    with balanced labels drawn with a seed (sample_images), then accuracy, FID, IS, precision and
    recall in the judge's features against the test images (evaluate). One seed gives every model
    the same labels and random numbers, so differences between models are not blurred by sampling
    noise; different seeds measure that noise."""

    def __init__(self, models, n):
        self.m, self.n = models, n
        self.labels = minicca.balanced_labels(n, models.K)
        self.real = minicca.classify(models.classifier, models.data["x_test"], DEVICE)[0]

    def __call__(self, model, cfg_scale, seed=0):
        m = self.m
        images, sec = minicca.sample_images(model, m.tokenizer, self.labels, cfg_scale, m.grid,
                                            m.P, DEVICE, seed)
        scores = minicca.evaluate(images, self.labels, m.classifier, self.real, DEVICE)
        return {**scores, "sec_per_image": sec}

    def real_floor(self, seed=0):
        """`n` real training images, balanced over classes, scored like samples: the best a
        generator can reach at this sample count (even real data has an FID above 0)."""
        rng = np.random.default_rng(seed)
        y, K = self.m.data["y_train"], self.m.K
        per_class = [rng.permutation(np.flatnonzero(y == c))[:self.n // K] for c in range(K)]
        index = np.stack(per_class, 1).reshape(-1)  # interleaved: 0, 1, ..., K-1, 0, 1, ...
        images = self.m.data["x_train"][index]
        return minicca.evaluate(images, y[index], self.m.classifier, self.real, DEVICE)


def mean_std(runs):
    """[{metric: value}, ...] over seeds -> {metric: (mean, sample standard deviation)}."""
    return {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs], ddof=1)))
            for k in runs[0] if runs[0][k] is not None}

# (end of shared setup)

# ----------------------------------------------------------------------------------------------------------
# Exercise checkers (solutions stay out of sight until asked for)
# Each check_* function takes the student's function, tries it on targeted inputs and returns []
# when it is right, or a one-item list naming the first problem (printed unless verbose=False).
# The model answers are the _solution_* functions at the end; `show_solution(name)` prints one,
# `solution(name)` returns it (the notebooks use that to check the checkers).
import inspect  # (math, numpy and torch come from the imports at the top)

import torch.nn.functional as F


def _minicca():
    import minicca  # imported late: the notebook has put minicca.py on sys.path by then

    return minicca


def _report(problems, verbose, success):
    if verbose:
        print(success if not problems else "PROBLEM: " + problems[0])
    return problems


def _nls(t):
    return -F.logsigmoid(t)


def _mean_neg(gap_neg, beta, lam, flags):
    flags = torch.zeros_like(gap_neg, dtype=torch.bool) if flags is None else flags
    return torch.where(flags, _nls(beta * gap_neg), lam * _nls(-beta * gap_neg)).mean()


class _Case:
    """One probe's inputs, with the right pieces of the loss precomputed for the mistakes below."""

    def __init__(self, gap_pos, gap_neg, policy_pos, beta, lam, flags):
        self.gp, self.gn, self.pp, self.beta, self.lam, self.fl = (
            gap_pos,
            gap_neg,
            policy_pos,
            beta,
            lam,
            flags,
        )
        self.pos = _nls(beta * gap_pos).mean()  # the right positive term
        self.neg = _mean_neg(gap_neg, beta, lam, flags)  # the right negative term, flags included
        self.unflagged = _mean_neg(gap_neg, beta, lam, None)  # the negative term ignoring flags


# Known mistakes in the CCA loss: (diagnosis, the loss it computes). Each probe of check_my_loss
# switches on one ingredient of the loss and tries only the mistakes that ingredient can reveal.
_POS_MISTAKES = [
    (
        "β is applied outside the sigmoid: use -log σ(β·gap), not -β·log σ(gap)",
        lambda t: (t.beta * _nls(t.gp)).mean(),
    ),
    ("β is missing: the logit is β·(policy - reference)", lambda t: _nls(t.gp).mean()),
    (
        "the reference is missing: the gap is policy_pos - ref_pos, not policy_pos alone",
        lambda t: _nls(t.beta * t.pp).mean(),
    ),
    (
        "the sign inside the sigmoid is flipped: the positive term is "
        "-log σ(+β·(policy_pos - ref_pos))",
        lambda t: _nls(-t.beta * t.gp).mean(),
    ),
    (
        "λ is missing from the negative term (with λ = 0 the negative term must vanish)",
        lambda t: t.pos + _nls(-t.beta * t.gn).mean(),
    ),
    ("the overall sign is wrong: the loss is -log σ(...), a positive number", lambda t: -t.pos),
    (
        "the batch is summed; each term is a mean over the batch",
        lambda t: _nls(t.beta * t.gp).sum(),
    ),
]
_NEG_MISTAKES = [
    (
        "wrong sign on the negative term: it is -λ·log σ(-β·gap_neg)",
        lambda t: t.pos + t.lam * _nls(t.beta * t.gn).mean(),
    ),
    ("λ is missing from the negative term", lambda t: t.pos + _nls(-t.beta * t.gn).mean()),
    (
        "λ multiplies the positive term too; it weights the negatives only",
        lambda t: t.lam * (t.pos + _nls(-t.beta * t.gn).mean()),
    ),
    (
        "β is applied outside the sigmoid in the negative term",
        lambda t: t.pos + t.lam * t.beta * _nls(-t.gn).mean(),
    ),
    (
        "the negative term uses the positive gap; it uses gap_neg = policy_neg - ref_neg",
        lambda t: t.pos + t.lam * _nls(-t.beta * t.gp).mean(),
    ),
    (
        "the loss is divided by max(λ, 1) even when normalize=False",
        lambda t: (t.pos + t.unflagged) / max(t.lam, 1),
    ),
]
_FLAG_MISTAKES = [
    (
        "flagged rows not treated as positives: a row with neg_as_pos=True contributes "
        "-log σ(+β·gap_neg), weight 1",
        lambda t: t.pos + t.unflagged,
    ),
    (
        "flagged rows are dropped; they stay in the mean over all B rows, as positives with "
        "weight 1",
        lambda t: t.pos + (t.lam * _nls(-t.beta * t.gn))[~t.fl].sum() / len(t.gn),
    ),
    (
        "flagged rows are weighted by λ; as positives they get weight 1",
        lambda t: t.pos
        + t.lam * torch.where(t.fl, _nls(t.beta * t.gn), _nls(-t.beta * t.gn)).mean(),
    ),
    (
        "flagged rows keep the minus sign inside the sigmoid; they are positives: "
        "-log σ(+β·gap_neg)",
        lambda t: t.pos + torch.where(t.fl, 1.0, t.lam).mul(_nls(-t.beta * t.gn)).mean(),
    ),
    (
        "neg_as_pos is inverted: True marks the rows to treat as positives",
        lambda t: t.pos + _mean_neg(t.gn, t.beta, t.lam, ~t.fl),
    ),
]
_NORM_MISTAKES = [
    ("missing normalisation by max(λ, 1) when normalize=True", lambda t: t.pos + t.neg),
    (
        "normalised by λ instead of max(λ, 1) (they differ when λ < 1)",
        lambda t: (t.pos + t.neg) / t.lam,
    ),
    ("normalised by 1 + λ instead of max(λ, 1)", lambda t: (t.pos + t.neg) / (1 + t.lam)),
    (
        "only the negative term is divided by max(λ, 1); the whole loss is",
        lambda t: t.pos + t.neg / max(t.lam, 1),
    ),
]
# (probe name, what it isolates, cases (beta, lam, flagged, normalize, pos_at_ref), mistakes to try)
_LOSS_PROBES = [
    (
        "positive term",
        "with λ = 0 and normalize=False only -mean log σ(β·(policy_pos - ref_pos)) remains",
        [(0.3, 0.0, False, False, False), (2.0, 0.0, False, False, False)],
        _POS_MISTAKES,
    ),
    (
        "negative term",
        "policy_pos = ref_pos, no flags, normalize=False: log 2 plus the λ-weighted term",
        [
            (0.3, 0.5, False, False, True),
            (1.5, 3.0, False, False, True),
            (0.7, 3.0, False, False, False),
        ],
        _NEG_MISTAKES,
    ),
    (
        "flagged rows",
        "neg_as_pos marks every third row, normalize=False",
        [(0.3, 0.5, True, False, False), (1.5, 3.0, True, False, False)],
        _FLAG_MISTAKES,
    ),
    (
        "normalisation",
        "normalize=True with λ below, at and above 1",
        [
            (0.5, 0.3, True, True, False),
            (0.5, 1.0, True, True, False),
            (0.5, 5.0, True, True, False),
        ],
        _NORM_MISTAKES,
    ),
]


def _loss_value(fn, pp, pn, rp, rn, beta, lam, flags, normalize):
    out = fn(pp, pn, rp, rn, beta=beta, lam=lam, neg_as_pos=flags, normalize=normalize)
    out = out[0] if isinstance(out, tuple) else out
    return float(out)


def check_my_loss(fn, seed=0, verbose=True):
    """Compare fn(policy_pos, policy_neg, ref_pos, ref_neg, *, beta, lam, neg_as_pos=None,
    normalize=True) with minicca.cca_loss, one ingredient at a time, then at large gaps, with the
    defaults and on the gradients. Returns [] if they agree, else [the first problem]."""
    cca_loss = _minicca().cca_loss
    g = torch.Generator().manual_seed(seed)
    success = "my loss agrees with minicca.cca_loss on every probe"

    def inputs(B=12, flagged=False, pos_at_ref=False):
        rp, rn = -30 + 5 * torch.randn(B, generator=g), -30 + 5 * torch.randn(B, generator=g)
        pp = rp.clone() if pos_at_ref else rp + 2 * torch.randn(B, generator=g)
        pn = rn + 2 * torch.randn(B, generator=g)
        flags = (torch.arange(B) % 3 == 1) if flagged else None
        return pp, pn, rp, rn, flags

    for name, what, cases, mistakes in _LOSS_PROBES:
        data = [
            (beta, lam, normalize) + inputs(flagged=flagged, pos_at_ref=at_ref)
            for beta, lam, flagged, normalize, at_ref in cases
        ]
        got, want = [], []
        for beta, lam, normalize, pp, pn, rp, rn, flags in data:
            try:
                got.append(_loss_value(fn, pp, pn, rp, rn, beta, lam, flags, normalize))
            except NotImplementedError:
                return _report(
                    ["not written yet: fill in the function, then run the cell again"],
                    verbose,
                    success,
                )
            except Exception as e:
                return _report(
                    [f"{name} probe: calling it raised {type(e).__name__}: {e}"], verbose, success
                )
            want.append(
                float(
                    cca_loss(
                        pp, pn, rp, rn, beta=beta, lam=lam, neg_as_pos=flags, normalize=normalize
                    )[0]
                )
            )
        if np.allclose(got, want, rtol=1e-5, atol=1e-7):
            continue
        if not np.isfinite(got).all():
            return _report(
                [
                    f"{name} probe: the loss is not finite ({got}); with λ = 0 did you divide by "
                    "λ? Use max(λ, 1), and only when normalize=True"
                ],
                verbose,
                success,
            )
        for message, wrong in mistakes:
            guess = [
                float(wrong(_Case(pp - rp, pn - rn, pp, beta, lam, flags)))
                for beta, lam, normalize, pp, pn, rp, rn, flags in data
            ]
            if np.allclose(got, guess, rtol=1e-5, atol=1e-7):
                return _report([f"{name}: {message}"], verbose, success)
        worst = np.abs(np.array(got) - np.array(want)).max()
        return _report(
            [f"{name}: differs from cca_loss ({what}); largest difference {worst:.3g}"],
            verbose,
            success,
        )

    # the values agree; at large gaps the loss must stay finite; defaults and gradients must agree
    rp = rn = torch.full((6,), -900.0)
    pp = rp + torch.tensor([800.0, -800.0, 5.0, -5.0, 800.0, -800.0])
    pn = rn + torch.tensor([-800.0, 800.0, 800.0, -800.0, 0.0, 3.0])
    flags = torch.tensor([False, False, True, False, False, True])
    try:
        big = _loss_value(fn, pp, pn, rp, rn, 1.0, 2.0, flags, True)
    except Exception as e:
        return _report([f"large gaps: calling it raised {type(e).__name__}: {e}"], verbose, success)
    want = float(cca_loss(pp, pn, rp, rn, beta=1.0, lam=2.0, neg_as_pos=flags)[0])
    if not np.isfinite(big):
        return _report(
            [
                "large gaps: the loss overflows to inf/nan at gaps of ±800: use F.logsigmoid(t), "
                "not torch.log(torch.sigmoid(t)) (σ(-800) underflows to 0)"
            ],
            verbose,
            success,
        )
    if not np.isclose(big, want, rtol=1e-5):
        return _report(
            [
                f"large gaps: {big:.6g} instead of {want:.6g} at gaps of ±800 (a clamp or an "
                "approximation?)"
            ],
            verbose,
            success,
        )
    pp, pn, rp, rn, flags = inputs(flagged=True)
    try:
        out = fn(pp, pn, rp, rn, beta=0.5, lam=3.0)
        default = float(out[0] if isinstance(out, tuple) else out)
    except Exception as e:
        return _report(
            [
                f"defaults: calling without neg_as_pos and normalize raised {type(e).__name__}: "
                f"{e}"
            ],
            verbose,
            success,
        )
    if not np.isclose(default, float(cca_loss(pp, pn, rp, rn, beta=0.5, lam=3.0)[0]), rtol=1e-5):
        return _report(
            ["defaults: neg_as_pos should default to None (no flags) and normalize to True"],
            verbose,
            success,
        )
    grads = []
    for f in (fn, cca_loss):
        a, b = pp.clone().requires_grad_(True), pn.clone().requires_grad_(True)
        out = f(a, b, rp, rn, beta=0.5, lam=3.0, neg_as_pos=flags, normalize=True)
        out = out[0] if isinstance(out, tuple) else out
        if not (torch.is_tensor(out) and out.requires_grad):
            return _report(
                [
                    "gradients: return a tensor that stays connected to the inputs (no .item(), "
                    "no detach)"
                ],
                verbose,
                success,
            )
        out.backward()
        grads.append(torch.cat([a.grad, b.grad]))
    if not torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8):
        return _report(
            ["gradients: the value is right but the gradient differs (something is detached)"],
            verbose,
            success,
        )
    return _report([], verbose, success)


def _random_toy(rng, n_images, n_classes):
    # a data set with every count >= 1: p(x|c) as columns (X, K), and p(x) with balanced classes
    counts = rng.integers(1, 10, size=(n_images, n_classes)).astype(float)
    p_x_given_c = counts / counts.sum(0)
    return p_x_given_c, p_x_given_c.mean(1)


# Known mistakes in λ*_s(c), as functions of (s, p(x|c) (X, K), p(x) (X,))
_LAM_MISTAKES = [
    (
        "this is Z_s(c) itself: λ*_s(c) = Z_s(c)^(1/s)",
        lambda s, pxc, px: (pxc ** (1 + s) * px[:, None] ** -s).sum(0),
    ),
    (
        "this is log λ*_s(c), the Rényi divergence D_{1+s}; λ* is its exponential",
        lambda s, pxc, px: np.log((pxc ** (1 + s) * px[:, None] ** -s).sum(0)) / s,
    ),
    (
        "the power is 1/(1+s); it is 1/s (Z_s(c) = λ^s is what makes the mass 1)",
        lambda s, pxc, px: (pxc ** (1 + s) * px[:, None] ** -s).sum(0) ** (1 / (1 + s)),
    ),
    (
        "the sum is missing the weight p(x|c): Z_s(c) = Σ_x p(x|c)·[p(x|c)/p(x)]^s",
        lambda s, pxc, px: ((pxc / px[:, None]) ** s).sum(0) ** (1 / s),
    ),
    (
        "p(x|c) and p(x) are swapped: Z_s(c) = Σ_x p(x|c)^(1+s)·p(x)^(-s)",
        lambda s, pxc, px: (px[:, None] ** (1 + s) * pxc**-s).sum(0) ** (1 / s),
    ),
    (
        "the ratio is raised to 1 + s; in Z_s(c) it is p(x|c)·[p(x|c)/p(x)]^s",
        lambda s, pxc, px: (pxc * (pxc / px[:, None]) ** (1 + s)).sum(0) ** (1 / s),
    ),
]


def check_lam_star(fn, verbose=True):
    """fn(s, p_x_given_c, p_x) -> array (K,) of λ*_s(c): p_x_given_c is (X, K), its columns sum
    to 1; p_x is (X,). Checked on random toys by its defining property: with λ = λ*_s(c) the
    free optimum p(x|c)·[p(x|c)/p(x)]^s·λ^(-s) sums to 1 over x, in every class."""
    rng = np.random.default_rng(0)
    success = "λ*_s(c) is right on every toy: the tilted p(x|c) has mass 1 in every class"
    cases = [
        (s,) + _random_toy(rng, X, K)
        for s, X, K in [(0.5, 6, 4), (1.0, 8, 3), (2.0, 5, 2), (3.0, 10, 5)]
    ]
    for s, pxc, px in cases:
        try:
            got = np.asarray(fn(s, pxc.copy(), px.copy()), dtype=float)
        except NotImplementedError:
            return _report(
                ["not written yet: fill in the function, then run the cell again"], verbose, success
            )
        except Exception as e:
            return _report([f"calling it raised {type(e).__name__}: {e}"], verbose, success)
        if got.shape != (pxc.shape[1],):
            return _report(
                [
                    f"shape {got.shape}: return one λ per class, shape ({pxc.shape[1]},); sum over "
                    "the images x (axis 0 of p_x_given_c)"
                ],
                verbose,
                success,
            )
        mass = (pxc * (pxc / px[:, None]) ** s).sum(0) / got**s
        if np.allclose(mass, 1.0, rtol=1e-8):
            continue
        for message, wrong in _LAM_MISTAKES:
            if np.allclose(got, wrong(s, pxc, px), rtol=1e-8):
                return _report([f"s = {s}: {message}"], verbose, success)
        return _report(
            [
                f"s = {s}: the tilted p(x|c) has mass {np.round(mass, 4)} instead of 1 (λ*_s(c) = "
                "Z_s(c)^(1/s) with Z_s(c) = Σ_x p(x|c)^(1+s) p(x)^(-s))"
            ],
            verbose,
            success,
        )
    return _report([], verbose, success)


def _labels_call(fn, labels, K, ratio, collisions, seed):
    out = fn(
        labels.clone(),
        K,
        uncond_ratio=ratio,
        collisions=collisions,
        generator=torch.Generator().manual_seed(seed),
    )
    if not (isinstance(out, tuple) and len(out) == 4):
        raise TypeError("return a tuple (pos_labels, neg_labels, neg_as_pos, keep)")
    return out


def check_contrastive_labels(fn, verbose=True):
    """fn(labels, num_classes, uncond_ratio=0.1, collisions="positive", generator=None) ->
    (pos_labels, neg_labels, neg_as_pos, keep), with minicca.contrastive_labels' semantics. Random
    parts (which rows are null, resampled classes) are checked by their properties, so the order in
    which random numbers are drawn does not matter; everything else must match exactly."""
    success = "contrastive labels: right in every mode"
    K = 5
    labels = torch.randint(0, K, (4000,), generator=torch.Generator().manual_seed(1))
    rolled = labels.roll(-1)
    collide = rolled == labels
    everything_kept = torch.ones_like(labels, dtype=torch.bool)
    try:
        for collisions in ["positive", "mask", "resample"]:
            pos, neg, flags, keep = _labels_call(fn, labels, K, 0.0, collisions, 0)
            if not all(
                torch.is_tensor(t) and t.shape == labels.shape for t in (pos, neg, flags, keep)
            ):
                return _report(["return four tensors of shape (B,)"], verbose, success)
            if flags.dtype != torch.bool or keep.dtype != torch.bool:
                return _report(["neg_as_pos and keep are boolean tensors"], verbose, success)
            where = f'collisions="{collisions}", uncond_ratio=0'
            if not torch.equal(pos, labels):
                return _report(
                    [f"{where}: without null rows the positive labels are the true labels"],
                    verbose,
                    success,
                )
            if collisions != "resample" and not torch.equal(neg, rolled):
                hint = (
                    " (this is roll(+1): the official code uses roll(-1), row i takes row i+1's "
                    "label)"
                    if torch.equal(neg, labels.roll(1))
                    else ""
                )
                return _report(
                    [
                        f"{where}: the negative label of row i is the true label of row i + 1, "
                        f"labels.roll(-1){hint}"
                    ],
                    verbose,
                    success,
                )
            if collisions == "positive":
                if not torch.equal(flags, collide):
                    return _report(
                        [f"{where}: neg_as_pos flags exactly the collisions (neg == pos)"],
                        verbose,
                        success,
                    )
                if not torch.equal(keep, everything_kept):
                    return _report([f"{where}: every row is kept"], verbose, success)
            if collisions == "mask":
                if flags.any():
                    return _report(
                        [f"{where}: masked collisions are dropped, not flagged"], verbose, success
                    )
                if not torch.equal(keep, ~collide):
                    return _report(
                        [f"{where}: keep is False exactly on the collisions"], verbose, success
                    )
            if collisions == "resample":
                if (neg == labels).any():
                    return _report(
                        [f"{where}: a resampled negative must differ from the true label"],
                        verbose,
                        success,
                    )
                if not torch.equal(neg[~collide], rolled[~collide]):
                    return _report(
                        [
                            f"{where}: only the collisions are resampled; other rows keep "
                            "labels.roll(-1)"
                        ],
                        verbose,
                        success,
                    )
                offsets = set(((neg - labels) % K)[collide].tolist())
                if offsets != set(range(1, K)):
                    return _report(
                        [
                            f"{where}: resampled classes should cover every wrong class, "
                            f"(c + randint(1, K)) mod K; got offsets {sorted(offsets)}"
                        ],
                        verbose,
                        success,
                    )
                if flags.any() or not torch.equal(keep, everything_kept):
                    return _report([f"{where}: no row is flagged or dropped"], verbose, success)
        for collisions in ["positive", "mask", "resample"]:
            pos, neg, flags, keep = _labels_call(fn, labels, K, 0.25, collisions, 0)
            where = f'collisions="{collisions}", uncond_ratio=0.25'
            null = pos == K
            share = null.double().mean().item()
            if not 0.22 < share < 0.28:
                return _report(
                    [
                        f"{where}: {share:.1%} of the rows got the null class {K} (= num_classes) "
                        "on the positive branch; expected about 25%"
                    ],
                    verbose,
                    success,
                )
            if not torch.equal(neg == K, null):
                return _report(
                    [f"{where}: a null row has the null class on both branches"], verbose, success
                )
            if not (flags[null].all() and keep[null].all()):
                return _report(
                    [f"{where}: null rows are flagged as positives and always kept"],
                    verbose,
                    success,
                )
            if not torch.equal(pos[~null], labels[~null]):
                return _report(
                    [f"{where}: rows that are not null keep their true label"], verbose, success
                )
            reference = _labels_call(fn, labels, K, 0.0, collisions, 0)
            same = [
                torch.equal(a[~null], b[~null]) for a, b in zip((neg, flags, keep), reference[1:])
            ]
            if collisions != "resample" and not all(same):
                return _report(
                    [f"{where}: rows that are not null are treated as with uncond_ratio=0"],
                    verbose,
                    success,
                )
        first = _labels_call(fn, labels, K, 0.25, "resample", 7)
        again = _labels_call(fn, labels, K, 0.25, "resample", 7)
        if not all(torch.equal(a, b) for a, b in zip(first, again)):
            return _report(
                [
                    "the same generator seed must give the same labels: draw every random number "
                    "with generator=generator"
                ],
                verbose,
                success,
            )
    except NotImplementedError:
        return _report(
            ["not written yet: fill in the function, then run the cell again"], verbose, success
        )
    except Exception as e:
        return _report([f"calling it raised {type(e).__name__}: {e}"], verbose, success)
    return _report([], verbose, success)


def _step0_reference(flagged_share, lam, B=200):
    # minicca.cca_loss at zero gaps on B rows, the first round(share·B) of them flagged
    zeros = torch.zeros(B, dtype=torch.float64)
    flags = torch.arange(B) < round(flagged_share * B)
    return float(
        _minicca().cca_loss(zeros, zeros, zeros, zeros, beta=0.1, lam=lam, neg_as_pos=flags)[0]
    )


_STEP0_MISTAKES = [
    (
        "flagged rows are ignored: they weigh 1, not λ, in the negative term",
        lambda f, lam: (1 + lam) * math.log(2) / max(lam, 1),
    ),
    (
        "the division by max(λ, 1) is missing (cca_loss normalises by default)",
        lambda f, lam: (1 + (1 - f) * lam + f) * math.log(2),
    ),
    (
        "divided by λ instead of max(λ, 1)",
        lambda f, lam: (1 + (1 - f) * lam + f) * math.log(2) / lam,
    ),
    (
        "flagged rows are dropped from the negative term; they stay, with weight 1",
        lambda f, lam: (1 + (1 - f) * lam) * math.log(2) / max(lam, 1),
    ),
]


def check_step0_loss(fn, verbose=True):
    """fn(flagged_share, lam) -> the value of minicca.cca_loss (normalize=True, the default) at
    step 0, when policy = reference, for a batch in which a share flagged_share of the rows is
    flagged."""
    success = "the step-0 loss is right for every share of flagged rows and every λ"
    cases = [(f, lam) for f in [0.0, 0.1, 0.19, 0.5, 1.0] for lam in [0.5, 1.0, 10.0, 100.0]]
    try:
        got = [float(fn(f, lam)) for f, lam in cases]
    except NotImplementedError:
        return _report(
            ["not written yet: fill in the function, then run the cell again"], verbose, success
        )
    except Exception as e:
        return _report([f"calling it raised {type(e).__name__}: {e}"], verbose, success)
    want = [_step0_reference(f, lam) for f, lam in cases]
    if np.allclose(got, want, rtol=1e-9):
        return _report([], verbose, success)
    for message, wrong in _STEP0_MISTAKES:
        if np.allclose(got, [wrong(f, lam) for f, lam in cases], rtol=1e-9):
            return _report([message], verbose, success)
    bad = next((f, lam, a, b) for (f, lam), a, b in zip(cases, got, want) if not np.isclose(a, b))
    return _report(
        [
            f"share {bad[0]}, λ = {bad[1]}: {bad[2]:.6f} instead of {bad[3]:.6f} (at step 0 every "
            "gap is 0, so every log σ(±0) is -log 2)"
        ],
        verbose,
        success,
    )


# ----- solutions: out of sight until asked for -----


def _solution_cca_loss(
    policy_pos, policy_neg, ref_pos, ref_neg, *, beta, lam, neg_as_pos=None, normalize=True
):
    gap_pos, gap_neg = policy_pos - ref_pos, policy_neg - ref_neg
    if neg_as_pos is None:
        flagged = torch.zeros_like(gap_neg, dtype=torch.bool)
    else:
        flagged = neg_as_pos.bool()
    pos = -F.logsigmoid(beta * gap_pos)
    neg = torch.where(flagged, -F.logsigmoid(beta * gap_neg), -lam * F.logsigmoid(-beta * gap_neg))
    loss = pos.mean() + neg.mean()
    return loss / max(lam, 1.0) if normalize else loss


def _solution_lam_star(s, p_x_given_c, p_x):
    Z = (p_x_given_c ** (1 + s) * p_x[:, None] ** (-s)).sum(0)  # Z_s(c), one per class
    return Z ** (1 / s)  # λ*_s(c) = Z_s(c)^(1/s)


def _solution_contrastive_labels(
    labels, num_classes, uncond_ratio=0.1, collisions="positive", generator=None
):
    B, K = len(labels), num_classes
    neg = labels.roll(-1)  # row i is paired with row i+1's class
    collide = neg == labels
    if collisions == "resample":  # a guaranteed mismatch for the colliding rows
        shift = torch.randint(1, K, (B,), generator=generator)
        neg = torch.where(collide, (labels + shift) % K, neg)
        collide = torch.zeros_like(collide)
    null = torch.rand(B, generator=generator) < uncond_ratio
    pos = torch.where(null, K, labels)  # class K is the null class, on both branches
    neg = torch.where(null, K, neg)
    if collisions == "mask":
        keep = ~collide | null
        flagged = null
    else:
        keep = torch.ones_like(collide)
        flagged = null | collide
    return pos, neg, flagged, keep


def _solution_step0_loss(flagged_share, lam):
    # every gap is 0: each log σ(±0) = -log 2. Positive term: log 2. Negative term: a share
    # (1 - f) of the rows with weight λ, a share f (flagged) with weight 1. Then / max(λ, 1).
    f = flagged_share
    return math.log(2) * (1 + (1 - f) * lam + f) / max(lam, 1.0)


_SOLUTIONS = {
    "cca_loss": _solution_cca_loss,
    "lam_star": _solution_lam_star,
    "contrastive_labels": _solution_contrastive_labels,
    "step0_loss": _solution_step0_loss,
}


def solution(name):
    """The model answer to exercise `name` (one of the keys of _SOLUTIONS), as a function."""
    if name not in _SOLUTIONS:
        raise KeyError(f"no exercise {name!r}; there are {sorted(_SOLUTIONS)}")
    return _SOLUTIONS[name]


def show_solution(name):
    """Print the model answer to exercise `name`: try first, then look."""
    print(inspect.getsource(solution(name)))


# (end of exercise checkers)


# ---- 03_porting checkers ----
# Self-contained: its own imports; minicca only for sequence_logprob (the shipped function).
import torch as _torch  # noqa: E402

import minicca as _minicca  # noqa: E402

_NOISE_SOURCES = {"p", "drop_prob", "attn_dropout_p", "dropout_prob"}


def _verdict(mistake, verbose):
    if mistake is None:
        if verbose:
            print("accepted")
        return True
    if verbose:
        print(f"not yet: {mistake}")
    return False


def check_remaining_noise(answer, verbose=True):
    """Exercise 'which noise source remains': the set of attribute names still injecting noise into
    the stand-in after every nn.Dropout's p is set to 0 (the names that no_randomness reports)."""
    answer = set(answer)
    if "p" in answer:
        mistake = "listed p: every nn.Dropout's p is already 0"
    elif "drop_prob" not in answer:
        mistake = "missed drop path (DropPath.drop_prob), a module but no nn.Dropout"
    elif "attn_dropout_p" not in answer:
        mistake = "missed the attention-dropout float (Attention.attn_dropout_p), passed to SDPA"
    elif "dropout_prob" not in answer:
        mistake = "missed label dropout in the embedder (LabelEmbedder.dropout_prob)"
    elif answer - _NOISE_SOURCES:
        mistake = f"{sorted(answer - _NOISE_SOURCES)} inject no noise in the stand-in"
    else:
        mistake = None
    return _verdict(mistake, verbose)


def check_official_accuracy_bound(answer, verbose=True):
    """Exercise 'predict the official reward accuracy's ceiling': answer(rows, flagged) -> the
    largest reward accuracy averaged over all rows, as the official scripts log it, when
    `flagged` of the `rows` are flagged and randomness is off."""
    cases = [(512, 80), (64, 0), (2, 2), (10, 3)]
    got = [float(answer(rows, flagged)) for rows, flagged in cases]
    right = [(rows - flagged) / rows for rows, flagged in cases]
    if all(abs(g - r) < 1e-9 for g, r in zip(got, right)):
        return _verdict(None, verbose)
    if all(abs(g - 1.0) < 1e-9 for g in got):
        mistake = "1.0: a flagged row has equal gaps on both branches, so it never wins"
    elif all(abs(g - f / r) < 1e-9 for g, (r, f) in zip(got, cases)):
        mistake = "the flagged share: it is the unflagged rows that can win"
    elif all(abs(g - 0.9) < 1e-9 for g in got):
        mistake = "1 - uncond_ratio: collisions are flagged too; use the flagged count given"
    else:
        mistake = f"wrong values {got} for (rows, flagged) = {cases}"
    return _verdict(mistake, verbose)


class TinyNextTokenModel(_torch.nn.Module):
    """The model of the exercise 'wire the log-likelihood': forward(tokens, labels) returns
    {"logits": (B, N, V)} where the class sits at position 0 of the input and logits[:, i]
    predicts tokens[:, i + 1]... except for i = N - 1; the first token is predicted by
    model.first_logits(labels) -> (B, V)."""

    def __init__(self, vocab=7, num_classes=3, dim=8, seed=0):
        super().__init__()
        g = _torch.Generator().manual_seed(seed)
        self.tok = _torch.nn.Parameter(_torch.randn(vocab, dim, generator=g))
        self.cls = _torch.nn.Parameter(_torch.randn(num_classes + 1, dim, generator=g))
        self.out = _torch.nn.Parameter(_torch.randn(dim, vocab, generator=g))

    def first_logits(self, labels):
        return self.cls[labels] @ self.out                                  # (B, V)

    def forward(self, tokens, labels):
        h = self.tok[tokens].cumsum(1) + self.cls[labels][:, None]          # (B, N, D)
        return {"logits": h @ self.out, "loss": _torch.tensor(0.0)}


def _true_logp(model, tokens, labels):
    first = model.first_logits(labels).log_softmax(-1).gather(1, tokens[:, :1]).squeeze(1)
    rest = model(tokens, labels)["logits"][:, :-1].log_softmax(-1)
    return first + rest.gather(2, tokens[:, 1:, None]).squeeze(2).sum(1)


def check_wire_logp(answer, verbose=True):
    """Exercise 'wire the log-likelihood': answer(model) -> callable (tokens, labels) -> (B,)
    sequence log-likelihoods for TinyNextTokenModel."""
    model = TinyNextTokenModel(seed=1)
    g = _torch.Generator().manual_seed(2)
    tokens, labels = _torch.randint(0, 7, (5, 6), generator=g), _torch.randint(0, 4, (5,),
                                                                              generator=g)
    try:
        got = answer(model)(tokens, labels)
    except Exception as error:  # noqa: BLE001  (report it as the mistake)
        return _verdict(f"it raised {type(error).__name__}: {error}", verbose)
    right = _true_logp(model, tokens, labels)
    logits = model(tokens, labels)["logits"]
    if not _torch.is_tensor(got) or got.shape != (5,):
        shape = tuple(got.shape) if _torch.is_tensor(got) else type(got).__name__
        mistake = f"returned {shape}, not (B,): sum the token log-probabilities per sequence"
    elif _torch.allclose(got, right, atol=1e-4):
        mistake = None
    elif _torch.allclose(got, _minicca.sequence_logprob(logits, tokens), atol=1e-4):
        mistake = "off by one: logits[:, i] predicts tokens[:, i + 1] in this model"
    elif _torch.allclose(got, right - _true_logp(model, tokens[:, :1], labels), atol=1e-4):
        mistake = "left out the first token (model.first_logits predicts it)"
    else:
        mistake = "not the sum over the N tokens of log p(x_i | c, x_<i)"
    return _verdict(mistake, verbose)
