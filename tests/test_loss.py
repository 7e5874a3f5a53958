"""The CCA loss, its baselines, negative pairing, the fine-tuning step, and the theory of cca_reference.md §3.

Oracles: the closed form at zero gaps, Eq. 12 written out with sigmoid/log, autograd, and, for the theory,
exact optima on a tabular model (no sampling): every expectation is computed exactly by cca_loss itself on a
batch whose rows are replicated in proportion to their probabilities.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import minicca
from minicca import cca_loss, contrastive_labels, dpo_loss, unlearning_loss

LOG2 = math.log(2.0)



def random_gaps(B=16, seed=0, scale=3.0):
    """Four (B,) float64 tensors: policy_pos, policy_neg, ref_pos, ref_neg (log-likelihoods)."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, generator=g, dtype=torch.float64) - 10 for _ in range(4)]


# ----------------------------------------------------------------------------------------------------------
# cca_loss: values

@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 10.0, 300.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_zero_gaps_give_the_closed_form(lam, normalize):
    z = torch.zeros(8)
    loss, stats = cca_loss(z, z, z, z, beta=0.1, lam=lam, normalize=normalize)
    expected = (1 + lam) * LOG2 / (max(lam, 1.0) if normalize else 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats == {"reward_acc": 0.0, "margin": 0.0, "gap_pos": 0.0, "gap_neg": 0.0}


@pytest.mark.parametrize("normalize", [True, False])
def test_zero_gaps_with_flagged_rows(normalize):
    """Flagged rows contribute log 2 with weight 1 (not λ) to the negative mean."""
    B, lam = 8, 10.0
    flags = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)   # 3 flagged rows of 8
    z = torch.full((B,), -7.0)                                         # equal policy and reference: zero gaps
    loss, _ = cca_loss(z, z, z, z, beta=0.3, lam=lam, neg_as_pos=flags, normalize=normalize)
    expected = LOG2 + (3 * 1.0 + 5 * lam) / B * LOG2
    if normalize:
        expected /= lam
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta,lam", [(0.02, 50.0), (0.3, 3.0), (1.0, 0.0)])
def test_equals_eq12_written_out(beta, lam):
    pp, pn, rp, rn = random_gaps()
    gp, gn = pp - rp, pn - rn
    eq12 = (-torch.log(torch.sigmoid(beta * gp))).mean() + (-lam * torch.log(torch.sigmoid(-beta * gn))).mean()
    loss, _ = cca_loss(pp, pn, rp, rn, beta=beta, lam=lam, normalize=False)
    assert loss.item() == pytest.approx(eq12.item(), rel=1e-6)
    normalized, _ = cca_loss(pp, pn, rp, rn, beta=beta, lam=lam)
    assert normalized.item() == pytest.approx(eq12.item() / max(lam, 1.0), rel=1e-6)


def test_flagged_rows_written_out():
    beta, lam = 0.5, 4.0
    pp, pn, rp, rn = random_gaps()
    flags = torch.arange(16) % 3 == 0
    gp, gn = pp - rp, pn - rn
    neg = torch.where(flags, -torch.log(torch.sigmoid(beta * gn)), -lam * torch.log(torch.sigmoid(-beta * gn)))
    expected = (-torch.log(torch.sigmoid(beta * gp))).mean() + neg.mean()
    loss, _ = cca_loss(pp, pn, rp, rn, beta=beta, lam=lam, neg_as_pos=flags, normalize=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_stats_keys_and_values():
    pp = torch.tensor([1.0, 2.0, 0.0, 5.0])
    pn = torch.tensor([0.0, 3.0, -1.0, 9.0])
    z = torch.zeros(4)
    flags = torch.tensor([False, False, False, True])     # the flagged row is left out of the stats
    for fn in (cca_loss, dpo_loss, unlearning_loss):
        _, stats = fn(pp, pn, z, z, beta=0.1, lam=2.0, neg_as_pos=flags)
        assert set(stats) == {"reward_acc", "margin", "gap_pos", "gap_neg"}
        # rows 0..2: gap_pos (1, 2, 0), gap_neg (0, 3, -1): wins 2 of 3, margins (1, -1, 1)
        assert stats["reward_acc"] == pytest.approx(2 / 3)
        assert stats["margin"] == pytest.approx(1 / 3)
        assert stats["gap_pos"] == pytest.approx(1.0)
        assert stats["gap_neg"] == pytest.approx(2 / 3)
        # detached 0-d tensors, not floats: no .item() (a host sync) inside the loss; float() them to log
        assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in stats.values())
        assert all(isinstance(float(v), float) for v in stats.values())


@pytest.mark.parametrize("fn", [cca_loss, dpo_loss, unlearning_loss])
def test_stats_are_detached_even_when_the_inputs_need_gradients(fn):
    pp, pn = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    z = torch.zeros(6)
    loss, stats = fn(pp, pn, z, z, beta=0.1, lam=2.0, neg_as_pos=torch.arange(6) % 2 == 0)
    assert loss.requires_grad
    assert not any(v.requires_grad for v in stats.values())


@pytest.mark.parametrize("fn", [cca_loss, dpo_loss, unlearning_loss])
def test_stats_when_every_row_is_flagged_average_over_all_rows(fn):
    pp, pn, z = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 0.0, 1.0]), torch.zeros(3)
    _, stats = fn(pp, pn, z, z, beta=0.1, lam=2.0, neg_as_pos=torch.ones(3, dtype=torch.bool))
    assert float(stats["reward_acc"]) == pytest.approx(2 / 3)
    assert float(stats["margin"]) == pytest.approx(4 / 3)
    assert float(stats["gap_pos"]) == pytest.approx(7 / 3) and float(stats["gap_neg"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# cca_loss: gradients

def test_gradient_signs():
    beta, lam = 0.5, 3.0
    pp, pn, rp, rn = random_gaps()
    flags = torch.arange(16) % 4 == 0

    def loss_of(pp, pn):
        return cca_loss(pp, pn, rp, rn, beta=beta, lam=lam, neg_as_pos=flags)[0]

    base = loss_of(pp, pn).item()
    for i in range(16):
        up = torch.zeros(16, dtype=torch.float64)
        up[i] = 0.1
        assert loss_of(pp + up, pn).item() < base, i            # a more likely true pair: lower loss
        if flags[i]:
            assert loss_of(pp, pn + up).item() < base, i        # flagged rows are positives
        else:
            assert loss_of(pp, pn + up).item() > base, i        # a more likely wrong pair: higher loss
    # the same, as signs of the autograd gradient
    pp, pn = pp.requires_grad_(), pn.requires_grad_()
    loss_of(pp, pn).backward()
    assert (pp.grad < 0).all()
    assert (pn.grad[~flags] > 0).all() and (pn.grad[flags] < 0).all()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [0.5, 10.0])
def test_gradient_at_initialisation_is_beta_over_2_times_unlearning(normalize, lam):
    beta, B = 0.2, 12
    ref_pos, ref_neg = -5 * torch.rand(B), -5 * torch.rand(B)
    flags = torch.arange(B) % 5 == 0

    def grads(loss_fn):
        pp, pn = ref_pos.clone().requires_grad_(), ref_neg.clone().requires_grad_()  # policy == reference
        loss, _ = loss_fn(pp, pn, ref_pos, ref_neg, beta=beta, lam=lam, neg_as_pos=flags, normalize=normalize)
        loss.backward()
        return pp.grad, pn.grad

    cca_pos, cca_neg = grads(cca_loss)
    unl_pos, unl_neg = grads(unlearning_loss)
    assert unl_pos.abs().min() > 0 and unl_neg.abs().min() > 0
    assert torch.allclose(cca_pos, beta / 2 * unl_pos, rtol=1e-6, atol=0)
    assert torch.allclose(cca_neg, beta / 2 * unl_neg, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_loss_and_gradients_at_huge_gaps(sign):
    B, beta = 6, 0.5
    flags = torch.tensor([True, False, False, True, False, False])
    for fn in (cca_loss, dpo_loss, unlearning_loss):
        for gap_pos, gap_neg in ((sign * 1e6, -sign * 1e6), (sign * 1e6, sign * 1e6)):
            pp = torch.full((B,), gap_pos, requires_grad=True)
            pn = torch.full((B,), gap_neg, requires_grad=True)
            z = torch.zeros(B)
            loss, _ = fn(pp, pn, z, z, beta=beta, lam=10.0, neg_as_pos=flags)
            loss.backward()
            assert torch.isfinite(loss), (fn.__name__, gap_pos, gap_neg)
            assert torch.isfinite(pp.grad).all() and torch.isfinite(pn.grad).all(), fn.__name__
    # and the values are the asymptotes: -log σ(t) -> 0 for t -> +inf, -> -t for t -> -inf
    big = torch.full((4,), 1e6)
    solved, _ = cca_loss(big, -big, 0 * big, 0 * big, beta=beta, lam=10.0, normalize=False)
    assert solved.item() == pytest.approx(0.0, abs=1e-6)
    wrong, _ = cca_loss(-big, big, 0 * big, 0 * big, beta=beta, lam=10.0, normalize=False)
    assert wrong.item() == pytest.approx(beta * 1e6 * (1 + 10.0), rel=1e-6)


def test_bad_hyperparameters_raise():
    z = torch.zeros(4)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            cca_loss(z, z, z, z, beta=beta, lam=1.0)
        with pytest.raises(ValueError):
            dpo_loss(z, z, z, z, beta=beta)
    for lam in (-0.1, float("nan")):
        with pytest.raises(ValueError):
            cca_loss(z, z, z, z, beta=0.1, lam=lam)
        with pytest.raises(ValueError):
            unlearning_loss(z, z, z, z, lam=lam)


@pytest.mark.parametrize("fn", [cca_loss, dpo_loss, unlearning_loss])
def test_mismatched_shapes_raise(fn):
    z4, z5, z41 = torch.zeros(4), torch.zeros(5), torch.zeros(4, 1)
    with pytest.raises(ValueError):
        fn(z4, z5, z4, z4, beta=0.1, lam=1.0)
    with pytest.raises(ValueError):
        fn(z4, z4, z4, z5, beta=0.1, lam=1.0)
    with pytest.raises(ValueError):
        fn(z41, z41, z41, z41, beta=0.1, lam=1.0)   # per-token log-likelihoods must be summed first
    with pytest.raises(ValueError):
        fn(z4, z4, z4, z4, beta=0.1, lam=1.0, neg_as_pos=torch.zeros(5, dtype=torch.bool))


def test_baselines_written_out():
    beta, lam = 0.4, 3.0
    pp, pn, rp, rn = random_gaps()
    flags = torch.arange(16) % 4 == 1
    gp, gn = pp - rp, pn - rn
    dpo, _ = dpo_loss(pp, pn, rp, rn, beta=beta, neg_as_pos=flags)
    expected = (-torch.log(torch.sigmoid(beta * (gp - gn))))[~flags].mean()
    assert dpo.item() == pytest.approx(expected.item(), rel=1e-6)
    unl, _ = unlearning_loss(pp, pn, rp, rn, lam=lam, neg_as_pos=flags, normalize=False)
    expected = -gp.mean() + torch.where(flags, -gn, lam * gn).mean()
    assert unl.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# contrastive_labels

K = 3


def batch_labels(B=300, seed=0):
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("collisions", ["positive", "mask", "resample"])
def test_contrastive_labels_common_rules(collisions):
    labels = batch_labels()
    pos, neg, flags, keep = contrastive_labels(labels, K, uncond_ratio=0.2, collisions=collisions,
                                               generator=torch.Generator().manual_seed(1))
    uncond = pos == K
    assert 20 < uncond.sum() < 100                             # about 20% of 300 rows
    assert torch.equal(neg == K, uncond)                       # null class on both branches, and only there
    assert torch.equal(pos[~uncond], labels[~uncond])          # other rows keep their true class
    assert flags[uncond].all()                                 # null rows are positives
    assert neg.min() >= 0 and neg.max() <= K
    rolled = labels.roll(-1)                                   # row i gets row i+1's label, never its own row's
    assert torch.equal(neg[~uncond & (rolled != labels)], rolled[~uncond & (rolled != labels)])
    assert keep.dtype == torch.bool and flags.dtype == torch.bool


def test_contrastive_labels_positive_flags_collisions_and_null_rows():
    labels = batch_labels()
    pos, neg, flags, keep = contrastive_labels(labels, K, uncond_ratio=0.2, collisions="positive",
                                               generator=torch.Generator().manual_seed(1))
    uncond = pos == K
    collide = labels.roll(-1) == labels
    assert collide.sum() > 50                                  # with 3 classes, about a third of the rows
    assert torch.equal(neg[~uncond], labels.roll(-1)[~uncond])
    assert torch.equal(flags, collide | uncond)
    assert keep.all()


def test_contrastive_labels_mask_drops_exactly_the_collided_non_null_rows():
    labels = batch_labels()
    pos, neg, flags, keep = contrastive_labels(labels, K, uncond_ratio=0.2, collisions="mask",
                                               generator=torch.Generator().manual_seed(1))
    uncond = pos == K
    collide = labels.roll(-1) == labels
    assert torch.equal(keep, ~(collide & ~uncond))
    assert torch.equal(flags, uncond)
    assert (neg[keep & ~uncond] != pos[keep & ~uncond]).all()


def test_contrastive_labels_resample_leaves_no_collisions():
    labels = batch_labels()
    pos, neg, flags, keep = contrastive_labels(labels, K, uncond_ratio=0.2, collisions="resample",
                                               generator=torch.Generator().manual_seed(1))
    uncond = pos == K
    assert (neg[~uncond] != labels[~uncond]).all()
    assert (neg[~uncond] < K).all()
    assert torch.equal(flags, uncond) and keep.all()


def test_contrastive_labels_without_uncond_rows():
    labels = batch_labels()
    for collisions in ("positive", "mask", "resample"):
        pos, neg, flags, keep = contrastive_labels(labels, K, uncond_ratio=0.0, collisions=collisions)
        assert (pos != K).all() and (neg != K).all()
        assert torch.equal(pos, labels)


def test_contrastive_labels_tiny_batch_never_pairs_a_row_with_itself():
    labels = torch.tensor([0, 1])
    pos, neg, flags, keep = contrastive_labels(labels, 2, uncond_ratio=0.0)
    assert torch.equal(neg, torch.tensor([1, 0])) and not flags.any()


# ----------------------------------------------------------------------------------------------------------
# cca_step_loss on a tiny GPT

def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return minicca.GPT(minicca.GPTConfig(vocab_size=8, num_classes=K, block_size=6, n_layer=1, n_head=2,
                                         n_embd=16, dropout=0.0))


def class_structured_tokens(labels, seed=0):
    """Class c writes tokens from {2c, 2c+1, 2c+2} (mod 8): the classes overlap but differ."""
    g = torch.Generator().manual_seed(seed)
    return (2 * labels[:, None] + torch.randint(0, 3, (len(labels), 6), generator=g)) % 8


def test_reference_gets_no_gradient_and_does_not_change():
    reference = tiny_gpt()
    policy = copy.deepcopy(reference)
    frozen = copy.deepcopy(reference.state_dict())
    labels = batch_labels(32)
    tokens = class_structured_tokens(labels)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for step in range(3):
        loss, _ = minicca.cca_step_loss(policy, reference, tokens, labels, beta=0.5, lam=2.0)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in reference.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
        opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    assert not torch.equal(policy.head.weight, reference.head.weight)  # the policy did move


def test_first_step_loss_is_the_closed_form_with_flags():
    reference = tiny_gpt()
    policy = copy.deepcopy(reference)
    labels = batch_labels(32)
    tokens, beta, lam = class_structured_tokens(labels), 0.5, 4.0
    loss, stats = minicca.cca_step_loss(policy, reference, tokens, labels, beta=beta, lam=lam,
                                        generator=torch.Generator().manual_seed(3))
    _, _, flags, _ = contrastive_labels(labels, K, 0.1, "positive", torch.Generator().manual_seed(3))
    n = int(flags.sum())
    assert 0 < n < 32
    expected = (LOG2 + (n * 1.0 + (32 - n) * lam) / 32 * LOG2) / lam
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["reward_acc"] == 0.0 and stats["margin"] == 0.0


@pytest.mark.parametrize("loss_name", ["cca", "dpo", "unlearning"])
def test_step_loss_runs_every_loss(loss_name):
    reference = tiny_gpt()
    policy = copy.deepcopy(reference)
    labels = batch_labels(16)
    loss, stats = minicca.cca_step_loss(policy, reference, class_structured_tokens(labels), labels,
                                        loss=loss_name)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(stats) == {"reward_acc", "margin", "gap_pos", "gap_neg"}


def test_a_few_cca_steps_raise_reward_accuracy_and_margin():
    reference = tiny_gpt()
    policy = copy.deepcopy(reference)
    labels = batch_labels(48)
    tokens = class_structured_tokens(labels)

    def step_loss(seed):
        return minicca.cca_step_loss(policy, reference, tokens, labels, beta=0.5, lam=2.0,
                                     generator=torch.Generator().manual_seed(seed))

    _, before = step_loss(0)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for step in range(20):
        loss, _ = step_loss(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, after = step_loss(0)                               # the same batch and pairing as `before`
    assert before["reward_acc"] == 0.0 and before["margin"] == 0.0   # policy == reference: all gaps 0
    assert after["reward_acc"] > 0.8, after
    assert after["margin"] > 1.0, after
    assert after["gap_pos"] > 0 > after["gap_neg"], after


# ----------------------------------------------------------------------------------------------------------
# The theory (cca_reference.md §3), exactly, on a tabular model
#
# x takes 6 values, c one of 3 classes with overlapping p(x|c), p(c) uniform. p(x|c) = counts / 20, so the
# expectation E_{p(x,c)}[pos] + λ E_{p(x)p(c)}[neg] is exactly the mean over a finite batch: each pair (x, c)
# appears counts[c, x] times, and each such row is paired with every class c' as its negative (so the
# negatives (x, c') are distributed as p(x)p(c')). cca_loss(normalize=False) on that batch IS the expectation.

COUNTS = torch.tensor([[8, 5, 3, 2, 1, 1],
                       [1, 3, 6, 6, 3, 1],
                       [2, 1, 1, 3, 5, 8]])
P_X_GIVEN_C = COUNTS.double() / COUNTS.sum(1, keepdim=True)       # (K, X)
P_X = P_X_GIVEN_C.mean(0)                                         # (X,), p(c) = 1/3
P_C = 1.0 / K
NULL = K


def exact_batch():
    """Rows (x, c, c⁻) such that batch means are exact expectations under p(x, c) and p(x)p(c⁻)."""
    c_grid, x_grid = torch.meshgrid(torch.arange(K), torch.arange(COUNTS.size(1)), indexing="ij")
    x = x_grid.flatten().repeat_interleave(COUNTS.flatten())      # 60 rows ~ p(x, c)
    c = c_grid.flatten().repeat_interleave(COUNTS.flatten())
    x, c_pos = x.repeat_interleave(K), c.repeat_interleave(K)     # each row once per negative class
    c_neg = torch.arange(K).repeat(len(c))
    return x, c_pos, c_neg


def reference_table():
    """log pφ(x|c) = log p(x|c) for c < K; the null row is log p(x)."""
    return torch.cat([P_X_GIVEN_C, P_X[None]]).log()              # (K+1, X)


def expected_cca(policy_table, ref_table, x, c_pos, c_neg, beta, lam, neg_as_pos=None):
    return cca_loss(policy_table[c_pos, x], policy_table[c_neg, x], ref_table[c_pos, x], ref_table[c_neg, x],
                    beta=beta, lam=lam, neg_as_pos=neg_as_pos, normalize=False)[0]


def minimise(params, objective, rounds=3):
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss
    for _ in range(rounds):
        opt.step(closure)
    return objective().item()


def test_the_batch_gives_exact_expectations():
    """The construction above, against the expectation written out as sums over x and c."""
    beta, lam = 0.7, 2.0
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(K + 1, 6, generator=g, dtype=torch.float64).log_softmax(1)
    ref = reference_table()
    gap = policy - ref
    p_joint = P_X_GIVEN_C * P_C                                   # (K, X)
    p_indep = P_X[None] * P_C
    written = (-(p_joint * F.logsigmoid(beta * gap[:K])).sum()
               - lam * (p_indep * F.logsigmoid(-beta * gap[:K])).sum())
    # rel 1e-7, not 1e-12: cca_loss builds its ±1 signs and λ weights as float32 tensors, so on float64 inputs
    # the negative branch uses β and λ rounded to float32 (harmless in float32 training)
    assert expected_cca(policy, ref, *exact_batch(), beta, lam).item() == pytest.approx(written.item(), rel=1e-7)


@pytest.mark.parametrize("lam", [0.5, 2.0])
@pytest.mark.parametrize("collisions_as_positives", [False, True])
def test_free_reward_optimum_is_the_log_density_ratio_minus_log_lambda(lam, collisions_as_positives):
    """D1 (and D8): with r(x, c) free (policy log-likelihood r/β, reference 0), the optimum is
    r* = log p(x|c)/p(x) - log λ, shifted by log(1 + p(c)) - log(1 - p(c|x)) when collisions are positives."""
    beta = 0.5
    x, c_pos, c_neg = exact_batch()
    flags = (c_neg == c_pos) if collisions_as_positives else None
    r = torch.zeros(K, 6, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(K, 6, dtype=torch.float64)
    minimise([r], lambda: expected_cca(r / beta, zero, x, c_pos, c_neg, beta, lam, flags))
    ratio = P_X_GIVEN_C / P_X
    r_star = ratio.log() - math.log(lam)
    if collisions_as_positives:
        p_c_given_x = P_X_GIVEN_C * P_C / P_X
        r_star = r_star + math.log(1 + P_C) - torch.log(1 - p_c_given_x)
    assert torch.allclose(r.detach(), r_star, atol=1e-4, rtol=0), (r.detach() - r_star).abs().max()


def cfg_target(s):
    """p_s(x|c) ∝ p(x|c)^(1+s) p(x)^(-s), and Z_s(c) = Σ_x p(x|c)^(1+s) p(x)^(-s)."""
    unnorm = P_X_GIVEN_C ** (1 + s) * P_X ** (-s)
    Z = unnorm.sum(1)
    return unnorm / Z[:, None], Z


def optimise_class_row(c, beta, lam):
    """Minimise the expected CCA loss over the normalised row pθ(·|c), all other rows held at the reference.
    The other rows only add a constant, so this is exactly class c's objective with its own λ."""
    x, c_pos, c_neg = exact_batch()
    ref = reference_table()
    logits = torch.zeros(6, dtype=torch.float64, requires_grad=True)     # starts at uniform, not at the answer

    def objective():
        table = torch.cat([ref[:c], logits.log_softmax(0)[None], ref[c + 1:]])
        return expected_cca(table, ref, x, c_pos, c_neg, beta, lam)
    minimise([logits], objective)
    return logits.detach().softmax(0)


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_cca_with_classwise_lambda_star_recovers_the_cfg_distribution_exactly(s):
    """D3: β = 1/s and λ*(c) = Z_s(c)^(1/s) make the CCA optimum exactly p_s(x|c)."""
    target, Z = cfg_target(s)
    lam_star = Z ** (1 / s)
    assert lam_star.max() - lam_star.min() > 0.1                  # the classes need different λ
    for c in range(K):
        p_theta = optimise_class_row(c, beta=1 / s, lam=lam_star[c].item())
        tv = 0.5 * (p_theta - target[c]).abs().sum().item()
        assert tv < 1e-3, (c, tv)
    # a single λ = 1 is not exact: the test can tell the difference
    tvs = [0.5 * (optimise_class_row(c, beta=1 / s, lam=1.0) - target[c]).abs().sum().item() for c in range(K)]
    assert max(tvs) > 0.02, tvs


def test_null_rows_flagged_as_positives_keep_the_unconditional_model():
    """D7: rows with the null class on both branches, flagged as positives, are optimised by pθ(x|null) = p(x)."""
    beta, lam = 0.5, 2.0
    x, c_pos, c_neg = exact_batch()
    x_null = x[c_neg == 0]                                        # 60 rows, x ~ p(x)
    null = torch.full_like(x_null, NULL)
    x_all, pos_all, neg_all = torch.cat([x, x_null]), torch.cat([c_pos, null]), torch.cat([c_neg, null])
    flags = torch.cat([torch.zeros_like(x, dtype=torch.bool), torch.ones_like(x_null, dtype=torch.bool)])
    ref = reference_table()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(K + 1, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    start_tv = 0.5 * (logits.detach()[NULL].softmax(0) - P_X).abs().sum().item()
    minimise([logits], lambda: expected_cca(logits.log_softmax(1), ref, x_all, pos_all, neg_all, beta, lam, flags))
    p_null = logits.detach()[NULL].softmax(0)
    assert start_tv > 0.1
    assert 0.5 * (p_null - P_X).abs().sum().item() < 1e-3
