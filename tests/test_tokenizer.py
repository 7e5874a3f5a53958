"""VQ tokenizer: straight-through gradients, where the commitment weight goes, codebook usage, the
l2-normalised lookup, that it learns, and that the codebook does not collapse in training.

All tests use a small tokenizer (hidden 16, 64 codes of dimension 8) on the MNIST subset in
tiny_data/ (and, for RGB, those digits coloured: a random colour per image on a random background).
"""
import copy
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minicca

SMALL = dict(hidden=16, codebook_size=64, code_dim=8)


@pytest.fixture(scope="module")
def data():
    return minicca.load_dataset(None)


@pytest.fixture(scope="module")
def images(data):
    """One batch of 64 real images, float (64, 1, 28, 28) in [0, 1]."""
    return minicca.to_float(data["x_train"][:64])


def small_tokenizer(seed=0, **overrides):
    torch.manual_seed(seed)
    return minicca.VQTokenizer(minicca.VQConfig(**{**SMALL, **overrides}))


def grads(module):
    """Concatenated gradients of a module's parameters (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in module.parameters()])


# --------------------------------------------------------------------------------------------------
# shapes and the hand-checkable pieces

def coloured(x_uint8, seed=0):
    """uint8 digits (N, H, W, 1) -> uint8 RGB (N, H, W, 3): ink of one random colour per image on a
    background of another, a small real RGB sample that needs no committed data."""
    rng = np.random.default_rng(seed)
    ink, background = rng.integers(0, 256, (2, len(x_uint8), 1, 1, 3))
    alpha = x_uint8.astype(np.float32) / 255
    return (alpha * ink + (1 - alpha) * background).round().astype(np.uint8)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_forward_shapes_and_encode_decode(images, l2_norm):
    tok = small_tokenizer(l2_norm=l2_norm)
    recon, vq, indices, z_e = tok(images)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert indices.shape == (64, 7, 7) and indices.dtype == torch.long
    assert z_e.shape == (64, 8, 7, 7)
    assert vq.dim() == 0
    assert torch.equal(tok.encode(images), indices)
    out = tok.decode(indices)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("l2_norm", [False, True])
def test_encode_decode_shapes_and_dtypes_on_rgb(data, l2_norm):
    """32x32 RGB (CIFAR-10's shape): 8x8 LongTensor grids, back to (B, 3, 32, 32) in [0, 1]."""
    rgb = coloured(data["x_train"][:16])                                    # (16, 28, 28, 3)
    x = F.pad(minicca.to_float(rgb), (2, 2, 2, 2))                          # (16, 3, 32, 32)
    tok = small_tokenizer(channels=3, l2_norm=l2_norm)
    indices = tok.encode(x)
    assert indices.shape == (16, 8, 8) and indices.dtype == torch.long
    assert indices.min() >= 0 and indices.max() < 64
    out = tok.decode(indices)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_l2_norm_puts_encoder_outputs_and_codes_on_the_unit_sphere(images):
    tok = small_tokenizer(l2_norm=True)
    with torch.no_grad():
        _, _, indices, z_e = tok(images)
        z_q = tok.lookup(indices)
    assert torch.allclose(z_e.norm(dim=1), torch.ones(64, 7, 7), atol=1e-5)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(64, 7, 7), atol=1e-5)
    assert not torch.allclose(tok.codebook.weight.norm(dim=1), torch.ones(64))  # stored as is


def test_checkpoints_made_before_l2_norm_load_as_plain_vq():
    """A vq_config saved before the field existed has no l2_norm: it must mean the lookup it was
    trained with (plain VQ-VAE), while train_tokenizer turns it on (tested below)."""
    old = {k: v for k, v in asdict(minicca.VQConfig()).items() if k != "l2_norm"}
    assert minicca.VQConfig(**old).l2_norm is False


@pytest.mark.parametrize("l2_norm", [False, True])
def test_quantize_picks_the_nearest_code_by_brute_force(images, l2_norm):
    tok = small_tokenizer(l2_norm=l2_norm)
    with torch.no_grad():
        z_e = tok.encoder(images)
        # so that many different codes are chosen
        tok.restart_codes(z_e, torch.ones(64, dtype=torch.bool))
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 8)
        codes = tok.codebook.weight
        if l2_norm:  # the lookup compares directions: both sides divided by their length
            flat = flat / flat.pow(2).sum(1, keepdim=True).sqrt()
            codes = codes / codes.pow(2).sum(1, keepdim=True).sqrt()
        dists = ((flat[:, None, :] - codes[None]) ** 2).sum(-1)  # (B*h*w, K), written out
        expected = dists.argmin(1).view(64, 7, 7)
    got = tok.quantize(z_e)
    # ties aside, the expanded-square formula must choose the same code as the direct distance
    # (on the sphere, blank patches give equal vectors, and codes restarted on them near-ties)
    agree = (got == expected).float().mean().item()
    assert agree > 0.99
    picked = dists.gather(1, got.view(-1, 1)).squeeze(1)
    assert torch.allclose(picked, dists.min(1).values, atol=1e-5)


def test_vq_losses_are_the_two_squared_distances():
    torch.manual_seed(0)
    z_e, z_q = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    codebook, commitment = minicca.vq_losses(z_e, z_q)
    expected = ((z_e - z_q) ** 2).mean()
    assert torch.allclose(codebook, expected) and torch.allclose(commitment, expected)


def test_codebook_stats_hand_computed():
    usage, perplexity = minicca.codebook_stats(torch.tensor([[0, 0], [1, 3]]), 4)
    assert usage == pytest.approx(3 / 4)
    # p = (1/2, 1/4, 0, 1/4): entropy 1.5 log 2, perplexity 2^1.5
    assert perplexity == pytest.approx(2 ** 1.5, rel=1e-6)
    usage, perplexity = minicca.codebook_stats(torch.arange(8), 8)
    assert usage == 1.0 and perplexity == pytest.approx(8.0, rel=1e-6)
    usage, perplexity = minicca.codebook_stats(torch.zeros(10, dtype=torch.long), 8)
    assert usage == 1 / 8 and perplexity == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("l2_norm", [False, True])
def test_straight_through_estimator_passes_reconstruction_grads_to_the_encoder(images, l2_norm):
    tok = small_tokenizer(l2_norm=l2_norm)
    recon, _, indices, z_e = tok(images)
    z_e.retain_grad()
    F.mse_loss(recon, images).backward()
    assert grads(tok.encoder).abs().sum() > 0    # the encoder learns from reconstruction alone
    assert grads(tok.codebook).abs().sum() == 0  # the codes do not: only the vq loss moves them
    # oracle: the straight-through gradient at z_e is exactly the decoder's gradient at z_q
    z_q = tok.lookup(indices).detach().requires_grad_(True)
    F.mse_loss(tok.decoder(z_q), images).backward()
    assert torch.allclose(z_e.grad, z_q.grad, rtol=1e-5, atol=1e-10)


def test_commitment_weight_scales_the_commitment_term_only(images):
    a, b = 0.25, 1.0
    tok_a = small_tokenizer(commitment=a)
    tok_b = copy.deepcopy(tok_a)
    tok_b.config.commitment = b
    assert tok_a.config.commitment == a  # the deepcopy did not share the config
    for tok in (tok_a, tok_b):
        _, vq, _, _ = tok(images)
        vq.backward()
    # the codebook term ||sg[z_e] - e||^2 does not depend on the weight ...
    assert grads(tok_a.codebook).abs().sum() > 0
    assert torch.allclose(grads(tok_a.codebook), grads(tok_b.codebook), rtol=1e-6, atol=0)
    # ... the commitment term ||z_e - sg[e]||^2 is the only one that reaches the encoder, scaled by
    # the weight
    g_a, g_b = grads(tok_a.encoder), grads(tok_b.encoder)
    assert g_b.abs().sum() > 0
    assert torch.allclose(g_a, (a / b) * g_b, rtol=1e-5, atol=1e-12)
    assert grads(tok_a.decoder).abs().sum() == 0  # the vq loss never touches the decoder


def test_vq_loss_value_is_codebook_plus_weighted_commitment(images):
    tok = small_tokenizer(commitment=0.4)
    with torch.no_grad():
        _, vq, indices, z_e = tok(images)
        d2 = ((z_e - tok.lookup(indices)) ** 2).mean()
    assert vq.item() == pytest.approx((1 + 0.4) * d2.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# codebook usage

def test_restart_codes_moves_dead_codes_onto_encoder_outputs_and_keeps_live_ones(images):
    tok = small_tokenizer()
    with torch.no_grad():
        z_e = tok.encoder(images)
    before = tok.codebook.weight.detach().clone()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    tok.restart_codes(z_e, dead)
    after = tok.codebook.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 8)
    # each restarted code IS one of the encoder outputs (squared distance 0 to its source)
    nearest = ((after[dead][:, None, :] - flat[None]) ** 2).sum(-1).min(1).values
    assert torch.all(nearest == 0)


def test_restart_codes_gives_high_usage_on_real_data_unlike_random_init(images):
    usages = []
    for seed in range(3):
        tok = small_tokenizer(seed)
        with torch.no_grad():
            z_e = tok.encoder(images)
        usage_random, _ = minicca.codebook_stats(tok.quantize(z_e), 64)   # default N(0, 1) codebook
        tok.restart_codes(z_e, torch.ones(64, dtype=torch.bool))          # data-driven init
        usage_restart, perplexity = minicca.codebook_stats(tok.quantize(z_e), 64)
        usages.append((usage_random, usage_restart))
        assert usage_restart > 0.5, usages
        assert usage_restart > usage_random + 0.25, usages
        assert perplexity > 16


def test_two_hundred_steps_reduce_reconstruction_error(data):
    """A short training run (200 Adam steps, restart_codes at step 0) must clearly learn."""
    tok = small_tokenizer(0)
    gen = torch.Generator().manual_seed(0)
    train = minicca.to_float(data["x_train"][:2048])
    held_out = minicca.to_float(data["x_test"][:256])
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)

    def held_out_mse():
        with torch.no_grad():
            return F.mse_loss(tok(held_out)[0], held_out).item()

    for step in range(200):
        batch = train[torch.randint(0, len(train), (64,), generator=gen)]
        if step == 0:
            with torch.no_grad():
                tok.restart_codes(tok.encoder(batch), torch.ones(64, dtype=torch.bool))
            initial = held_out_mse()
        recon, vq, _, _ = tok(batch)
        loss = F.mse_loss(recon, batch) + vq
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = held_out_mse()
    assert math.isfinite(final)
    assert final < 0.25 * initial, (initial, final)  # measured: 0.143 -> 0.014
    all_black = F.mse_loss(torch.zeros_like(held_out), held_out).item()
    assert final < 0.5 * all_black, (final, all_black)  # beats the trivial all-black image
    usage, _ = minicca.codebook_stats(tok.encode(held_out), 64)
    assert usage > 0.5  # the codebook did not collapse (measured 0.92)


# --------------------------------------------------------------------------------------------------
# the collapse: a regression test for train_tokenizer itself (its restarts, the l2 lookup, and all)

# Measured (seed 0, 2048 images, 100 steps; the smallest per-step usage of steps 1..99, then the
# held-out perplexity): digits 0.77 and 44, coloured digits 0.86 and 51 of 64 codes. The tokenizer
# before (plain lookup, restarts every 100 steps), the same run: about 0.06 and 8, 0.03 and 16.
USAGE_FLOOR = 0.5
PERPLEXITY_FLOOR = 25.0
# With an autoencoder warm-up of 20 steps (cpu_rgb: 100 of 2,000), the smallest usage of the
# quantised steps 20..99: digits 0.98, coloured digits 0.98; 5 steps are too few here (0.97, 0.88),
# 10 too (0.95, 0.89). With the plain lookup (the cpu preset's): digits 0.98.
USAGE_FLOOR_AFTER_WARMUP = 0.95


def train_100_steps(x_uint8, tmp_path, warmup=0.0, l2_norm=True):
    """train_tokenizer on x_uint8 (N, H, W, C): 100 steps at batch 64, the small tokenizer."""
    P = {**minicca.COMMON, **minicca.PRESETS["micro"], "vq_hidden": 16, "codebook_size": 64,
         "code_dim": 8, "vq_steps": 100, "vq_batch": 64, "vq_lr": 2e-3, "vq_ae_warmup": warmup,
         "vq_l2_norm": l2_norm}
    torch.manual_seed(0)
    ckpt = minicca.train_tokenizer({"x_train": x_uint8}, P, 0, torch.device("cpu"))
    tok = minicca.VQTokenizer(minicca.VQConfig(**ckpt["vq_config"]))
    tok.load_state_dict(ckpt["model"])
    return ckpt, tok.eval()


@pytest.mark.parametrize("kind", ["digits", "coloured digits"])
def test_codebook_usage_stays_high_over_the_first_100_steps(data, kind, tmp_path):
    """The collapse this guards against: on CIFAR-10 usage fell from 98% to about 10% of the codes
    between restarts every 100 steps. Each step's usage is logged on its training batch. No
    warm-up here: the restarts and the l2 lookup alone."""
    colour = (lambda x: x) if kind == "digits" else coloured
    ckpt, tok = train_100_steps(colour(data["x_train"][:2048]), tmp_path)
    assert ckpt["vq_config"]["l2_norm"] is True
    assert ckpt["vq_config"]["channels"] == (1 if kind == "digits" else 3)
    usage = [h["usage"] for h in ckpt["history"][1:]]                       # steps 1..99
    assert len(usage) == 99
    assert min(usage) > USAGE_FLOOR, (kind, min(usage), usage.index(min(usage)) + 1)
    report = minicca.tokenizer_report(tok, colour(data["x_test"][:512]), "cpu")
    assert report["perplexity"] > PERPLEXITY_FLOOR, (kind, report)


@pytest.mark.parametrize("kind, l2_norm", [("digits", True), ("coloured digits", True),
                                           ("digits", False)])
def test_after_the_autoencoder_warmup_every_batch_uses_most_codes(data, kind, l2_norm, tmp_path):
    """The warm-up (every preset's, longer here): the first 20 steps train a plain autoencoder (no
    usage logged, the codebook sits out); from the codebook's init on, every batch uses >= 95% of
    the codes (without it, the early steps dip: the test above, and CIFAR-10 57%), with the l2
    lookup (cpu_rgb, gpu) and with the plain one on digits (the cpu preset's MNIST tokenizer; on
    coloured digits, which the cpu_rgb preset gets, the plain lookup's floor was 0.94)."""
    colour = (lambda x: x) if kind == "digits" else coloured
    ckpt, tok = train_100_steps(colour(data["x_train"][:2048]), tmp_path, warmup=0.2,
                                l2_norm=l2_norm)
    assert ckpt["vq_config"]["l2_norm"] is l2_norm
    history = ckpt["history"]
    assert [h["step"] for h in history if "usage" not in h] == list(range(20))
    assert all(math.isfinite(h["mse"]) for h in history)
    usage = [h["usage"] for h in history if "usage" in h]                  # steps 20..99
    assert len(usage) == 80
    assert min(usage) >= USAGE_FLOOR_AFTER_WARMUP, (kind, min(usage), usage)
    report = minicca.tokenizer_report(tok, colour(data["x_test"][:512]), "cpu")
    assert report["perplexity"] > PERPLEXITY_FLOOR, (kind, report)


def test_the_warmup_trains_the_autoencoder_without_touching_the_codebook(images):
    """quantize=False: the decoder reads z_e itself, and no gradient reaches the codebook."""
    torch.manual_seed(0)
    tok = minicca.VQTokenizer(minicca.VQConfig(1, 16, 64, 8, l2_norm=True))
    recon, vq_loss, indices, z_e = tok(images, quantize=False)
    assert vq_loss is None and indices is None
    torch.testing.assert_close(recon, tok.decoder(z_e))
    F.mse_loss(recon, images).backward()
    assert tok.codebook.weight.grad is None
    assert tok.encoder[0].weight.grad.abs().sum() > 0
