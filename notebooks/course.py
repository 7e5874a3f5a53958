"""Helpers for the course notebooks: shared setup (00 and 02) and exercise checkers (01, 02).

Notebooks import this module from notebooks/ (their working directory); it imports minicca, never
re-implements it.
"""

# ----------------------------------------------------------------------------------------------------------
# Shared setup (00_tour, 02_tradeoff)

# (end of shared setup)

# ----------------------------------------------------------------------------------------------------------
# Exercise checkers (solutions stay out of sight until asked for)
# Each check_* function takes the student's function, tries it on targeted inputs and returns []
# when it is right, or a one-item list naming the first problem (printed unless verbose=False).
# The model answers are the _solution_* functions at the end; `show_solution(name)` prints one,
# `solution(name)` returns it (the notebooks use that to check the checkers).
import inspect
import math

import numpy as np
import torch
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
