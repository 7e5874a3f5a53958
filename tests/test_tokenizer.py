"""VQ tokenizer: straight-through gradients, where the commitment weight goes, codebook usage, and that it learns.

All tests use a small tokenizer (hidden 16, 64 codes of dimension 8) on the MNIST subset in tiny_data/.
"""
import copy
import math

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


# ----------------------------------------------------------------------------------------------------------
# shapes and the hand-checkable pieces

def test_forward_shapes_and_encode_decode(images):
    tok = small_tokenizer()
    recon, vq, indices, z_e = tok(images)
    assert recon.shape == images.shape
    assert indices.shape == (64, 7, 7) and indices.dtype == torch.long
    assert z_e.shape == (64, 8, 7, 7)
    assert vq.dim() == 0
    assert torch.equal(tok.encode(images), indices)
    out = tok.decode(indices)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


def test_quantize_picks_the_nearest_code_by_brute_force(images):
    tok = small_tokenizer()
    with torch.no_grad():
        z_e = tok.encoder(images)
        tok.restart_codes(z_e, torch.ones(64, dtype=torch.bool))  # so that many different codes are chosen
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 8)
        dists = ((flat[:, None, :] - tok.codebook.weight[None]) ** 2).sum(-1)  # (B*h*w, K), written out
        expected = dists.argmin(1).view(64, 7, 7)
    got = tok.quantize(z_e)
    # ties aside (none here), the expanded-square formula must choose the same code as the direct distance
    agree = (got == expected).float().mean().item()
    assert agree > 0.999
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


# ----------------------------------------------------------------------------------------------------------
# gradients

def test_straight_through_estimator_passes_reconstruction_grads_to_the_encoder(images):
    tok = small_tokenizer()
    recon, _, indices, z_e = tok(images)
    z_e.retain_grad()
    F.mse_loss(recon, images).backward()
    assert grads(tok.encoder).abs().sum() > 0          # the encoder learns from reconstruction alone
    assert grads(tok.codebook).abs().sum() == 0        # the codes do not: they learn from the vq loss only
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
    # ... the commitment term ||z_e - sg[e]||^2 is the only one that reaches the encoder, scaled by the weight
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


# ----------------------------------------------------------------------------------------------------------
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
        tok.restart_codes(z_e, torch.ones(64, dtype=torch.bool))          # data-driven initialisation
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
    assert final < 0.5 * all_black, (final, all_black)  # better than the trivial "predict black" image
    usage, _ = minicca.codebook_stats(tok.encode(held_out), 64)
    assert usage > 0.5  # the codebook did not collapse (measured 0.92)
