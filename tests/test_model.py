"""The class-conditional GPT and its sampler: causality, exact likelihoods, KV cache, CFG, token sampling.

Oracles: brute-force enumeration of every sequence, per-prefix recomputation, and hand-computed cases.
The tiny models get larger-than-default random weights so that their distributions are far from uniform.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import minicca



def tiny_gpt(seed=0, vocab_size=8, num_classes=3, block_size=6, n_layer=2, n_head=2, n_embd=16, scale=0.3):
    torch.manual_seed(seed)
    model = minicca.GPT(minicca.GPTConfig(vocab_size=vocab_size, num_classes=num_classes, block_size=block_size,
                                          n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0))
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits: make them interesting
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def random_tokens(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, model.config.block_size), generator=g)


# ----------------------------------------------------------------------------------------------------------
# forward pass and likelihoods

def test_causality_logits_at_i_depend_on_tokens_before_i_only():
    model = tiny_gpt()
    N, V = model.config.block_size, model.config.vocab_size
    tokens, labels = random_tokens(model, 4), torch.tensor([0, 1, 2, 3])
    base = model(tokens, labels)
    assert base.shape == (4, N, V)
    for j in range(N):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % V
        logits = model(changed, labels)
        # positions 0..j see only tokens[:, :i] with i <= j: unchanged
        assert torch.allclose(logits[:, :j + 1], base[:, :j + 1], atol=1e-6, rtol=0), j
        if j < N - 1:  # some later position must react (the model is not blind to its prefix)
            assert (logits[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-3, j
        else:          # the last token is never an input (teacher forcing): nothing changes at all
            assert torch.allclose(logits, base, atol=1e-6, rtol=0)


def test_class_label_changes_every_position():
    model = tiny_gpt()
    tokens = random_tokens(model, 2)
    a, b = model(tokens, torch.tensor([0, 0])), model(tokens, torch.tensor([1, 1]))
    assert ((a - b).abs().amax(dim=(0, 2)) > 1e-3).all()


def all_sequences(V, N):
    return torch.tensor(list(itertools.product(range(V), repeat=N)))  # (V^N, N)


def test_sequence_logprob_is_a_normalised_distribution_for_every_class_and_null():
    model = tiny_gpt(vocab_size=3, num_classes=2, block_size=3)
    seqs = all_sequences(3, 3)                                      # all 27 sequences
    dists = []
    for c in range(model.config.num_classes + 1):                   # label 2 is the null class
        labels = torch.full((len(seqs),), c)
        logp = minicca.sequence_logprob(model(seqs, labels), seqs)
        assert logp.shape == (27,) and logp.dtype == torch.float32
        assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-5), c
        dists.append(torch.exp(logp))
    assert (dists[0] - dists[1]).abs().sum() > 1e-2                 # the classes do differ


def test_sequence_logprob_equals_the_product_of_per_token_softmax_probabilities():
    model = tiny_gpt(vocab_size=3, num_classes=2, block_size=3)
    x, c = torch.tensor([[2, 0, 1]]), torch.tensor([1])
    prob = 1.0
    for i in range(3):
        # the distribution of token i given the class and x[:i]: recomputed from the prefix alone
        logits_i = model(x[:, :i + 1], c)[0, -1]
        prob *= (torch.exp(logits_i) / torch.exp(logits_i).sum())[x[0, i]].item()
    logp = minicca.sequence_logprob(model(x, c), x)
    assert torch.exp(logp).item() == pytest.approx(prob, rel=1e-5)


def test_sequence_logprob_hand_computed_and_float32():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]])).half()  # (1, 2, 3), half precision
    logp = minicca.sequence_logprob(logits, torch.tensor([[0, 2]]))
    assert logp.dtype == torch.float32
    assert logp.item() == pytest.approx(float(torch.log(torch.tensor(0.5 * 0.3))), abs=2e-3)


def test_null_class_is_a_valid_label():
    model = tiny_gpt()
    K = model.config.num_classes
    tokens = random_tokens(model, 3)
    null = torch.full((3,), K)
    logits = model(tokens, null)
    assert logits.shape == (3, model.config.block_size, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    out = minicca.generate(model, null, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, model.config.block_size)
    assert out.min() >= 0 and out.max() < model.config.vocab_size
    with pytest.raises(IndexError):  # K + 1 is out of range: there is exactly one null class
        model(tokens, torch.full((3,), K + 1))


# ----------------------------------------------------------------------------------------------------------
# KV cache

def manual_attention(attn, x):
    """The five lines SelfAttention's fused call stands for: softmax(q kᵀ / √d + causal mask) v."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in attn.qkv(x).split(C, 2))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))                 # (B, nh, T, T)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))  # no peeking
    return attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


def test_self_attention_equals_manual_attention_with_and_without_the_cache():
    model = tiny_gpt(n_embd=16, n_head=2)
    attn = model.blocks[0].attn
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(0))
    reference = manual_attention(attn, x)
    assert torch.allclose(attn(x), reference, atol=1e-5, rtol=0)
    cache = []
    stepwise = torch.cat([attn(x[:, t:t + 1], cache) for t in range(6)], dim=1)  # one position each
    assert len(cache) == 2 and cache[0].shape == (3, 2, 6, 8)                     # (B, nh, T, hd)
    assert torch.allclose(stepwise, reference, atol=1e-5, rtol=0)
    # the mask matters: position 0 must not see position 5
    changed = x.clone()
    changed[:, 5] += 1.0
    assert torch.allclose(attn(changed)[:, :5], reference[:, :5], atol=1e-5, rtol=0)
    assert not torch.allclose(attn(changed)[:, 5], reference[:, 5], atol=1e-3)


def test_decode_step_logits_match_the_full_forward():
    model = tiny_gpt()
    tokens, labels = random_tokens(model, 4), torch.tensor([0, 1, 2, 3])
    full = model(tokens, labels)
    cache, prev = model.new_cache(), None
    for t in range(model.config.block_size):
        step = model.decode_step(prev, labels, cache)
        assert torch.allclose(step, full[:, t], atol=1e-5, rtol=1e-5), t
        prev = tokens[:, t]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (4, None), (None, 0.8), (4, 0.8)])
def test_kv_cache_generates_exactly_the_tokens_of_full_recomputation(cfg_scale, top_k, top_p):
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    outs = [minicca.generate(model, labels, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p, use_cache=use_cache,
                             generator=torch.Generator().manual_seed(123))
            for use_cache in (True, False)]
    assert torch.equal(outs[0], outs[1])
    other_seed = minicca.generate(model, labels, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                                  generator=torch.Generator().manual_seed(7))
    assert not torch.equal(outs[0], other_seed)  # the samples are random, so the equality above means something


# ----------------------------------------------------------------------------------------------------------
# classifier-free guidance

def test_cfg_logits_scale_one_is_conditional_scale_zero_is_unconditional():
    torch.manual_seed(0)
    cond, uncond = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.allclose(minicca.cfg_logits(cond, uncond, 1.0), cond, atol=1e-6)
    assert torch.equal(minicca.cfg_logits(cond, uncond, 0.0), uncond)


def test_cfg_logits_hand_computed():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    # l_u + w (l_c - l_u) with w = 3: [0.5 + 3 * 0.5, -1 + 3 * 3]
    assert torch.allclose(minicca.cfg_logits(cond, uncond, 3.0), torch.tensor([2.0, 8.0]))


def test_guided_greedy_generation_matches_a_hand_written_loop():
    """Greedy CFG decoding, written out: conditional rows use the label, unconditional rows the null class."""
    model = tiny_gpt()
    labels, w, K = torch.tensor([0, 1, 2]), 2.5, model.config.num_classes
    expected = torch.zeros(3, model.config.block_size, dtype=torch.long)
    for t in range(model.config.block_size):
        prefix = expected[:, :t + 1]
        cond = model(prefix, labels)[:, -1]
        uncond = model(prefix, torch.full_like(labels, K))[:, -1]
        expected[:, t] = (uncond + w * (cond - uncond)).argmax(-1)
    got = minicca.generate(model, labels, cfg_scale=w, temperature=0)
    assert torch.equal(got, expected)
    unguided = minicca.generate(model, labels, cfg_scale=1.0, temperature=0)
    assert not torch.equal(got, unguided)  # guidance changed something, so the check above is not vacuous


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_runs_B_rows_without_guidance_and_2B_rows_with_it(use_cache):
    model = tiny_gpt()
    B, N, K = 3, model.config.block_size, model.config.num_classes
    labels = torch.tensor([0, 1, 2])
    seen = []  # (number of rows, labels) of every model call

    if use_cache:
        original = model.decode_step

        def spy(prev, rows, cache):
            seen.append((len(rows), rows.clone()))
            return original(prev, rows, cache)
        model.decode_step = spy
    else:
        model.register_forward_pre_hook(lambda module, args: seen.append((len(args[1]), args[1].clone())))

    minicca.generate(model, labels, cfg_scale=1.0, use_cache=use_cache)
    assert len(seen) == N and all(rows == B for rows, _ in seen)
    assert all(torch.equal(lab, labels) for _, lab in seen)
    seen.clear()
    minicca.generate(model, labels, cfg_scale=2.0, use_cache=use_cache)
    assert len(seen) == N and all(rows == 2 * B for rows, _ in seen)
    assert all(torch.equal(lab, torch.cat([labels, torch.full((B,), K)])) for _, lab in seen)


def test_generate_restores_the_training_mode():
    model = tiny_gpt()
    model.train()
    minicca.generate(model, torch.tensor([0]))
    assert model.training
    model.eval()
    minicca.generate(model, torch.tensor([0]))
    assert not model.training


# ----------------------------------------------------------------------------------------------------------
# sample_token

def test_sample_token_top_k_1_tiny_top_p_and_temperature_0_are_greedy():
    torch.manual_seed(0)
    logits = 2 * torch.randn(64, 12)
    greedy = logits.argmax(-1)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(minicca.sample_token(logits, top_k=1, generator=g), greedy)
        assert torch.equal(minicca.sample_token(logits, top_p=1e-6, generator=g), greedy)
        assert torch.equal(minicca.sample_token(logits, temperature=0), greedy)
        assert torch.equal(minicca.sample_token(logits, temperature=0, top_k=5, top_p=0.5), greedy)
    plain = minicca.sample_token(logits, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(plain, greedy)  # plain sampling is not greedy, so the checks above are not vacuous


def frequencies(logits_row, draws=20000, seed=0, **kw):
    logits = logits_row.expand(draws, -1)
    tokens = minicca.sample_token(logits, generator=torch.Generator().manual_seed(seed), **kw)
    return torch.bincount(tokens, minlength=logits_row.numel()).float() / draws


def test_sample_token_top_k_samples_the_renormalised_top_k():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))
    freq = frequencies(logits, top_k=3)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85  # tokens 1, 3, 4 renormalised
    assert freq[[0, 2]].sum() == 0
    assert torch.allclose(freq, expected, atol=0.02)


def test_sample_token_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    # sorted: 0.5, 0.3 (cumulative 0.8 >= 0.7: stop) -> keep tokens 1 and 3
    freq = frequencies(logits, top_p=0.7)
    assert freq[[0, 2]].sum() == 0
    assert torch.allclose(freq, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]), atol=0.02)
    # p exactly reached by the first token: 0.5 >= 0.5 keeps token 1 alone
    assert frequencies(logits, draws=200, top_p=0.5)[1] == 1.0


def test_sample_token_temperature_scales_the_logits():
    logits = torch.tensor([0.0, 1.0, 2.0])
    freq = frequencies(logits, temperature=2.0)
    assert torch.allclose(freq, F.softmax(logits / 2.0, -1), atol=0.02)


# ----------------------------------------------------------------------------------------------------------
# the gpu preset at full size, on the CPU: what a first GPU run would otherwise find out

def gpt_parameters(V, K, N, L, d):
    """Closed form: embeddings (K+1 classes, V tokens, N positions), per block 12 d^2 + 13 d (qkv, proj,
    two MLP matrices with biases, two LayerNorms), final LayerNorm, untied head."""
    return (K + 1) * d + V * d + N * d + L * (12 * d * d + 13 * d) + 2 * d + d * V


def test_gpu_preset_at_full_size_steps_and_samples_in_bf16_on_the_cpu():
    P = {**minicca.COMMON, **minicca.PRESETS["gpu"]}
    V, K, N, L, d = P["codebook_size"], 10, 64, P["n_layer"], P["n_embd"]          # CIFAR-10: 8x8 tokens
    torch.manual_seed(0)
    gpt = minicca.GPT(minicca.GPTConfig(V, K, N, L, P["n_head"], d, P["dropout"]))
    assert sum(p.numel() for p in gpt.parameters()) == gpt_parameters(V, K, N, L, d)
    tokens, labels = torch.randint(0, V, (4, N)), torch.tensor([0, 1, 2, K])
    opt = minicca.adamw(gpt, P["lr"], 0.05)
    with minicca.autocast(torch.device("cpu"), "bf16"):
        logits = gpt(tokens, labels)
        assert logits.dtype == torch.bfloat16 and logits.shape == (4, N, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in gpt.parameters())
    assert all(torch.isfinite(p).all() for p in gpt.parameters())
    # one CCA step at full size
    reference = minicca.GPT(gpt.config).eval().requires_grad_(False)
    with minicca.autocast(torch.device("cpu"), "bf16"):
        cca, stats = minicca.cca_step_loss(gpt.eval(), reference, tokens, labels[:4] % K)
    cca.backward()
    assert torch.isfinite(cca) and cca.dtype == torch.float32
    # sampling: a couple of positions with CFG under bf16 (logits are cast to float32 for sampling)
    short = minicca.GPT(minicca.GPTConfig(V, K, 2, L, P["n_head"], d))
    with minicca.autocast(torch.device("cpu"), "bf16"):
        out = minicca.generate(short, torch.tensor([3, 4]), cfg_scale=2.0,
                               generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2) and out.dtype == torch.long and int(out.max()) < V
    # the tokenizer and the judge at the preset's size, one step each in bf16
    tok = minicca.VQTokenizer(minicca.VQConfig(3, P["vq_hidden"], V, P["code_dim"], l2_norm=True))
    images = torch.rand(4, 3, 32, 32)
    with minicca.autocast(torch.device("cpu"), "bf16"):
        with torch.no_grad():  # the codebook init, as train_tokenizer does it: bf16 outputs, fp32 codes
            tok.restart_codes(tok.encoder(images), torch.ones(V, dtype=torch.bool))
        recon, vq_loss, idx, z_e = tok(images)
        loss = F.mse_loss(recon.float(), images) + vq_loss
    loss.backward()
    assert recon.shape == images.shape and idx.shape == (4, 8, 8) and idx.dtype == torch.long
    assert tok.codebook.weight.dtype == torch.float32 and torch.isfinite(loss)
    judge = minicca.JudgeNet(3, 10)
    with minicca.autocast(torch.device("cpu"), "bf16"):
        logits = judge(images)
    F.cross_entropy(logits.float(), torch.arange(4)).backward()
    assert judge.features(images).shape == (4, 128) and logits.shape == (4, 10)
