"""
minicca: Condition Contrastive Alignment (CCA) for class-conditional autoregressive image models.

CCA (Chen et al., ICLR 2025, arXiv 2410.09347) fine-tunes an AR image model so that plain sampling,
with no classifier-free guidance (CFG), reaches CFG's quality at half the sampling cost. This file
does the whole job on MNIST / CIFAR-10 / your own .npz, top to bottom like the paper:

    1. data  2. VQ tokenizer  3. class-conditional GPT  4. sampling with and without CFG
    5. the CCA loss and its baselines  6. training  7. evaluation  8. the pipeline

Sections 1-7 take plain values (settings, seed, device); section 8 is where the command line meets
them. Below the "Plumbing" banner is what a reader can skip: the porting kit (docs/porting.md),
validation, checkpoints, torchrun, judges, figures, the CLI (the benchmark: tools/). Cut on purpose:
perceptual/GAN tokenizer losses, 2D/rotary positions, VAR, Inception FID (see README.md).
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_DATA = os.path.join(HERE, "tiny_data", "mnist_tiny.npz")
PRETRAINED = os.path.join(HERE, "tiny_data", "pretrained")

# -------------------------------------------------------------------------------------------------
# 1. Data: every source becomes the same dict of uint8 NHWC images and int64 labels

def load_dataset(name=None, data_root="data"):
    """'mnist' | 'cifar10' (torchvision) | a path to an .npz | None (tiny_data/'s MNIST subset) ->
    {"x_train": uint8 (N, H, W, C), "y_train": int64 (N,), "x_test", "y_test", "classes": [str]},
    checked by validate_arrays (see Plumbing)."""
    name = TINY_DATA if name in (None, "tiny") else name
    kind = {"mnist": "MNIST", "cifar10": "CIFAR10"}.get(name)  # torchvision's class; None: an .npz
    arrays = _load_torchvision(kind, data_root) if kind else _load_npz(name)
    return validate_arrays(arrays, name)

def to_float(x_uint8):
    """uint8 (B, H, W, C) numpy -> float (B, C, H, W) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8))
    return rearrange(x, "b h w c -> b c h w").float().div(255)

# -------------------------------------------------------------------------------------------------
# 2. VQ tokenizer: images -> grids of discrete codes (van den Oord et al., 2017), 4x downsampling

@dataclass
class VQConfig:
    channels: int = 1          # 1 for grayscale, 3 for RGB
    hidden: int = 64           # conv width
    codebook_size: int = 256   # the GPT's vocabulary
    code_dim: int = 32
    commitment: float = 0.25   # weight of ||z_e - sg[e]||^2 (sg: stop-gradient)
    l2_norm: bool = False      # look up by cosine, z_e and codes on the unit sphere (ViT-VQGAN,
    #                            LlamaGen): on in every preset but cpu (vq_l2_norm); off: VQ-VAE

class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)

def vq_losses(z_e, z_q):
    """The two VQ-VAE terms. The commitment weight belongs on the second one only (a bug copied
    across many VQGAN codebases puts it on the first)."""
    codebook = F.mse_loss(z_q, z_e.detach())    # ||sg[z_e] - e||^2: moves the codes to the encoder
    commitment = F.mse_loss(z_e, z_q.detach())  # ||z_e - sg[e]||^2: keeps the encoder near them
    return codebook, commitment

class VQTokenizer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.encoder = nn.Sequential(
            nn.Conv2d(c.channels, c.hidden, 4, 2, 1), nn.ReLU(),   # (B, hid, H/2, W/2)
            nn.Conv2d(c.hidden, c.hidden, 4, 2, 1),                # (B, hid, H/4, W/4)
            ResBlock(c.hidden), ResBlock(c.hidden), nn.ReLU(),
            nn.Conv2d(c.hidden, c.code_dim, 1))                    # (B, d, h, w)
        self.decoder = nn.Sequential(
            nn.Conv2d(c.code_dim, c.hidden, 3, padding=1),
            ResBlock(c.hidden), ResBlock(c.hidden), nn.ReLU(),
            nn.ConvTranspose2d(c.hidden, c.hidden, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c.hidden, c.channels, 4, 2, 1))     # (B, C, H, W), no sigmoid
        self.codebook = nn.Embedding(c.codebook_size, c.code_dim)  # (K, d): the code vectors

    def project(self, v):
        """With l2_norm, vectors along dim 1 onto the unit sphere, where an encoder that grows or
        drifts cannot leave the codes far behind; else v unchanged."""
        return F.normalize(v, dim=1) if self.config.l2_norm else v

    def codes(self):
        """The codebook as lookup and quantize see it: (K, d)."""
        return self.project(self.codebook.weight)

    def quantize(self, z_e):
        """(B, d, h, w) -> indices of the nearest codes (B, h, w)."""
        B, d, h, w = z_e.shape
        flat = rearrange(self.project(z_e), "b d h w -> (b h w) d")
        codes = self.codes()                                                 # (K, d)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, for every (vector, code) pair: (B*h*w, K)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return rearrange(dist.argmin(1), "(b h w) -> b h w", b=B, h=h, w=w)

    def lookup(self, indices):
        return rearrange(F.embedding(indices, self.codes()), "b h w d -> b d h w")

    def forward(self, images, quantize=True):
        """images (B, C, H, W) in [0, 1] -> (reconstruction, vq loss, indices (B, h, w), z_e), z_e
        (B, d, h, w) as the quantizer sees it (on the sphere with l2_norm). quantize=False: a
        plain autoencoder, (decoder(z_e), None, None, z_e) (train_tokenizer's warm-up)."""
        z_e = self.project(self.encoder(images))
        if not quantize:
            return self.decoder(z_e), None, None, z_e
        indices = self.quantize(z_e)
        z_q = self.lookup(indices)
        codebook, commitment = vq_losses(z_e, z_q)
        z_st = z_e + (z_q - z_e).detach()  # straight-through: forward sees z_q, grads go to z_e
        return self.decoder(z_st), codebook + self.config.commitment * commitment, indices, z_e

    @torch.no_grad()
    def encode(self, images):
        """(B, C, H, W) in [0, 1] -> LongTensor (B, H/4, W/4)."""
        return self.quantize(self.encoder(images))

    @torch.no_grad()
    def decode(self, indices):
        """LongTensor (B, h, w) -> images (B, C, 4h, 4w) in [0, 1] (the linear output clamped)."""
        return self.decoder(self.lookup(indices)).clamp(0, 1)

    @torch.no_grad()
    def restart_codes(self, z_e, dead):
        """Codebook init and dead-code restarts: move the `dead` (bool (K,)) codes onto random
        encoder outputs z_e (B, d, h, w)."""
        flat = rearrange(z_e.detach(), "b d h w -> (b h w) d")
        pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)
        self.codebook.weight[dead] = flat[pick].to(self.codebook.weight.dtype)  # bf16 autocast

def codebook_stats(indices, codebook_size):
    """Share of the codes used, and the perplexity of their distribution (at most codebook_size)."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    p = p[p > 0]
    return (counts > 0).float().mean().item(), torch.exp(-(p * p.log()).sum()).item()

# -------------------------------------------------------------------------------------------------
# 3. The class-conditional GPT (nanoGPT-style): [class, x_1 .. x_{N-1}] -> logits for x_1 .. x_N

@dataclass
class GPTConfig:
    vocab_size: int = 256     # codebook size
    num_classes: int = 10     # K; label K is the null class used by condition dropout and CFG
    block_size: int = 49      # N, tokens per image (7x7 for MNIST, 8x8 for CIFAR-10)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.dropout = c.dropout
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x, cache=None):
        """x (B, T, C) -> (B, T, C). With a cache (a list [k, v] for this layer), x is the next
        position only (T = 1): its keys and values are appended and it attends to every cached
        position, so no mask is needed."""
        T = x.size(1)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.n_head)          # (B, nh, T, hd)
                   for t in self.qkv(x).chunk(3, dim=2))
        if cache is not None:
            assert T == 1, "cached decoding feeds one position at a time"
            if cache:
                k = torch.cat([cache[0], k], 2)                                 # (B, nh, t+1, hd)
                v = torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        # y = softmax(q kᵀ / √hd + causal mask) v, fused (flash/memory-efficient kernels)
        causal = cache is None and T > 1
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.n_embd)
        self.attn = SelfAttention(c)
        self.ln2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(),
                                 nn.Linear(4 * c.n_embd, c.n_embd), nn.Dropout(c.dropout))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.class_emb = nn.Embedding(c.num_classes + 1, c.n_embd)  # row K: the null class
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.block_size, c.n_embd))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _through_blocks(self, x, start=0, cache=None):
        """Input embeddings (B, T, C) of positions start .. start + T - 1 -> logits (B, T, V)."""
        x = self.drop(x + self.pos_emb[:, start:start + x.size(1)])               # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.head(self.ln_f(x))                                            # (B, T, V)

    def forward(self, tokens, labels):
        """tokens (B, T <= N), labels (B,) -> logits (B, T, V), teacher-forced: logits[:, i] is the
        distribution of token i given the class and tokens[:, :i] (the last token is never read)."""
        class_token = self.class_emb(labels)[:, None]                             # (B, 1, C)
        x = torch.cat([class_token, self.tok_emb(tokens[:, :-1])], dim=1)         # (B, T, C)
        return self._through_blocks(x)

    def decode_step(self, prev_tokens, labels, cache):
        """Logits (B, V) of the next position, appending to `cache` (a list with one [] per layer
        to start). prev_tokens (B,) is the previous position's token (ignored at position 0)."""
        t = cache[0][0].size(2) if cache[0] else 0                                # positions done
        x = (self.class_emb(labels) if t == 0 else self.tok_emb(prev_tokens))[:, None]  # (B, 1, C)
        return self._through_blocks(x, start=t, cache=cache)[:, 0]

    def new_cache(self):
        return [[] for _ in self.blocks]

def sequence_logprob(logits, tokens):
    """log p(x|c) = sum over the N tokens of log p(x_i | c, x_<i): logits (B, N, V), tokens (B, N)
    -> (B,), in float32."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
    return -nll.view(tokens.shape).sum(1)

# -------------------------------------------------------------------------------------------------
# 4. Sampling, with classifier-free guidance as one doubled batch

def cfg_logits(cond_logits, uncond_logits, scale):
    """LlamaGen's convention: l_u + w (l_c - l_u). w = 1 is no guidance; w = 1 + s targets
    p(x|c)[p(x|c)/p(x)]^s per token (the VAR paper writes t = w - 1). Mixing logits or log-probs
    gives the same samples (they differ by a constant)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)

def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need top_k >= 1 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:  # nucleus: keep the smallest set with mass >= top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before it already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

@torch.no_grad()
def generate(model, labels, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None,
             use_cache=True, generator=None):
    """Sample token sequences (B, N) for `labels` (B,). cfg_scale == 1 runs only the B conditional
    rows; any other scale runs [conditional; unconditional] as one 2B batch, so CFG costs twice the
    compute per token."""
    was_training = model.training
    model.eval()
    B, N, K = len(labels), model.config.block_size, model.config.num_classes
    guided = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, K)]) if guided else labels  # (R,): 2B or B
    out = torch.zeros(B, N, dtype=torch.long, device=labels.device)
    cache = model.new_cache() if use_cache else None
    for t in range(N):
        if use_cache:
            prev = out[:, t - 1].repeat(2 if guided else 1) if t > 0 else None
            logits = model.decode_step(prev, rows, cache)                               # (R, V)
        else:  # the KV cache's naive reference: the prefix again (out[:, t], still 0, is unread)
            logits = model(out[:, :t + 1].repeat(2 if guided else 1, 1), rows)[:, -1]  # (R, V)
        logits = logits.float()
        if guided:
            logits = cfg_logits(logits[:B], logits[B:], cfg_scale)                      # (B, V)
        out[:, t] = sample_token(logits, temperature, top_k, top_p, generator)
    model.train(was_training)
    return out

# -------------------------------------------------------------------------------------------------
# 5. The CCA loss and its baselines: pure functions of per-sequence log-likelihoods. With
#    sequence_logprob and the porting kit (first below the banner), what another codebase copies,
#    torch only (docs/porting.md); the last function, cca_step_loss, is this file's own use.

def _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos):
    """Four (B,) tensors of the same shape; returns neg_as_pos as bool (B,) (all False if None)."""
    shapes = {t.shape for t in (policy_pos, policy_neg, ref_pos, ref_neg)}
    if len(shapes) != 1 or policy_pos.dim() != 1:
        raise ValueError(f"expected four (B,) tensors of per-sequence log-likelihoods, got "
                         f"shapes {shapes}")
    if neg_as_pos is None:
        return torch.zeros_like(policy_pos, dtype=torch.bool)
    if neg_as_pos.shape != policy_pos.shape:
        raise ValueError(f"neg_as_pos has shape {tuple(neg_as_pos.shape)}, expected "
                         f"{tuple(policy_pos.shape)}")
    return neg_as_pos.bool()

def _reward_stats(gap_pos, gap_neg, flagged):
    """Diagnostics over the contrastive rows (all rows if every row is flagged), as detached 0-d
    tensors: masked means, so no host sync and no data-dependent shape (torch.compile-friendly)."""
    real = ~flagged
    rows = torch.where(real.any(), real, torch.ones_like(real))         # (B,) True = counted
    count = rows.sum()
    gp, gn = gap_pos.detach(), gap_neg.detach()

    def mean(x):  # where, not a product: an infinite gap in a row left out must not give NaN
        return torch.where(rows, x, torch.zeros_like(x)).sum() / count
    return {"reward_acc": mean((gp > gn).float()), "margin": mean(gp - gn),
            "gap_pos": mean(gp), "gap_neg": mean(gn)}

def cca_loss(policy_pos, policy_neg, ref_pos, ref_neg, *, beta, lam, neg_as_pos=None,
             normalize=True):
    """Condition Contrastive Alignment loss (Chen et al., 2025, Eq. 12), official semantics.

        L = -log σ(β·[log pθ(x|c) - log pφ(x|c)]) - λ·log σ(-β·[log pθ(x|c⁻) - log pφ(x|c⁻)])

    Inputs: (B,) sequence log-likelihoods (summed over tokens) of the trainable policy pθ and the
    frozen reference pφ, on true pairs (x, c) ("pos") and mismatched pairs (x, c⁻) ("neg").
    beta (> 0) scales the log-ratio, a sum over N tokens: fewer tokens want a larger β. lam (>= 0)
    weights the negatives: at small β a threshold "keep x where p(c|x) > λ·p(c)".
    neg_as_pos (bool (B,)) flags negative rows that are really positives (null class on both
    branches, or c⁻ == c): they get -log σ(+β·gap) with weight 1. Both terms are batch means;
    `normalize` divides by max(λ, 1), as the official code does. Returns (loss, stats): reward
    accuracy, margin, mean gaps over the unflagged rows, detached 0-d tensors (float() to log).

    At zero gaps every log σ(0) = -log 2, so the loss is (1 + λ)·log 2 / max(λ, 1):
        >>> z = torch.zeros(4)
        >>> round(cca_loss(z, z, z, z, beta=0.1, lam=10.0)[0].item(), 4)   # 11 * 0.6931 / 10
        0.7625
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the log-likelihood ratio), got {beta}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0 (the weight of the negative term), got {lam}")
    flagged = _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos)
    gap_pos = policy_pos - ref_pos               # log pθ(x|c)/pφ(x|c); implicit reward β·gap
    gap_neg = policy_neg - ref_neg               # log pθ(x|c⁻)/pφ(x|c⁻)
    pos_term = -F.logsigmoid(beta * gap_pos)     # -log σ(β·gap_pos): raise the true pair
    one = torch.ones_like(gap_neg)
    sign = torch.where(flagged, one, -one)       # flagged rows are positives: -log σ(+β·gap)
    weight = torch.where(flagged, one, lam * one)             # true negatives weigh λ, flagged 1
    neg_term = -weight * F.logsigmoid(sign * beta * gap_neg)  # -λ·log σ(-β·gap_neg)
    loss = pos_term.mean() + neg_term.mean()     # logsigmoid is stable: finite at gaps of ±1e6
    if normalize:
        loss = loss / max(lam, 1.0)              # the official rescale, for grad clipping's sake
    return loss, _reward_stats(gap_pos, gap_neg, flagged)

def dpo_loss(policy_pos, policy_neg, ref_pos, ref_neg, *, beta, lam=None, neg_as_pos=None,
             normalize=True):
    """DPO baseline: -log σ(β·(gap_pos - gap_neg)). Controls only the *relative* likelihood,
    which lets both fall (it collapses LlamaGen in the paper). Flagged rows are no contrast and
    are left out (a masked mean). lam and normalize are unused: no term is weighted by λ."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    flagged = _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos)
    gap_pos, gap_neg = policy_pos - ref_pos, policy_neg - ref_neg
    real = (~flagged).float()
    loss = -F.logsigmoid(beta * (gap_pos - gap_neg))
    return (loss * real).sum() / real.sum().clamp(min=1), _reward_stats(gap_pos, gap_neg, flagged)

def unlearning_loss(policy_pos, policy_neg, ref_pos, ref_neg, *, beta=None, lam, neg_as_pos=None,
                    normalize=True):
    """Unlearning baseline: -log pθ(x|c) + λ·log pθ(x|c⁻) (flagged rows count as positives,
    weight 1), written with gaps: 0 at initialisation, the same gradient. Unbounded below; CCA's
    sigmoids are what switch off solved pairs. beta is unused."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    flagged = _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos)
    gap_pos, gap_neg = policy_pos - ref_pos, policy_neg - ref_neg
    neg = torch.where(flagged, -gap_neg, float(lam) * gap_neg)
    loss = -gap_pos.mean() + neg.mean()
    if normalize:
        loss = loss / max(lam, 1.0)
    return loss, _reward_stats(gap_pos, gap_neg, flagged)

LOSSES = {"cca": cca_loss, "dpo": dpo_loss, "unlearning": unlearning_loss}

def contrastive_labels(labels, num_classes, uncond_ratio=0.1, collisions="positive",
                       generator=None):
    """Pair each image with a wrong class from the same (micro-)batch, as the official code does:
    roll by one, so each row takes the next row's class, which may be its own (a collision).
    Returns (pos_labels, neg_labels, neg_as_pos, keep), each (B,):
    - collisions (c⁻ == c, ~1/K of rows): "positive" flags them (official), "mask" drops those
      rows (keep = False), "resample" draws c⁻ = (c + U{1..K-1}) mod K, a guaranteed mismatch;
    - uncond_ratio of the rows get the null class (id num_classes) on both branches, flagged as
      positives: this keeps the unconditional model alive, so CFG still works after CCA.
    Example: labels [0, 1, 1, 2] roll to negatives [1, 1, 2, 0]; row 1 collides (1 == 1).
    """
    B, K = len(labels), num_classes
    neg = labels.roll(-1)
    collide = neg == labels
    if collisions == "resample":
        shift = torch.randint(1, K, (B,), generator=generator, device=labels.device) if K > 1 else 0
        neg = torch.where(collide, (labels + shift) % K, neg)
        collide = neg == labels
    uncond = torch.rand(B, generator=generator, device=labels.device) < uncond_ratio
    pos = torch.where(uncond, K, labels)
    neg = torch.where(uncond, K, neg)
    if collisions == "mask":
        return pos, neg, uncond, ~collide | uncond
    return pos, neg, uncond | collide, torch.ones_like(collide)

def paired_logps(policy_logp, ref_logp, tokens, labels, num_classes, uncond_ratio=0.1,
                 collisions="positive", generator=None):
    """One batch as 2B rows [true pairs; negatives] through any model: policy_logp and ref_logp
    map (tokens (R, N), labels (R,)) to (R,) sequence log-likelihoods. Returns the policy's (2B,)
    (with gradients), the reference's (2B,) (without) and the (B,) neg_as_pos flags."""
    pos, neg, flags, keep = contrastive_labels(labels, num_classes, uncond_ratio, collisions,
                                               generator)
    tokens, pos, neg, flags = tokens[keep], pos[keep], neg[keep], flags[keep]
    both_tokens, both_labels = torch.cat([tokens, tokens]), torch.cat([pos, neg])  # (2B, N)
    logp = policy_logp(both_tokens, both_labels)                                   # (2B,)
    with torch.no_grad():
        ref = ref_logp(both_tokens, both_labels)
    return logp, ref, flags

def cca_batch_loss(policy_logp, ref_logp, tokens, labels, num_classes, loss="cca", beta=0.1,
                   lam=10.0, uncond_ratio=0.1, collisions="positive", generator=None):
    """The loss of one (micro-)batch for any model (callables as in paired_logps): tokens (B, N),
    labels (B,) -> (loss, stats); the policy runs on 2B rows with gradients, the reference not."""
    logp, ref, flags = paired_logps(policy_logp, ref_logp, tokens, labels, num_classes,
                                    uncond_ratio, collisions, generator)
    B = len(flags)
    return LOSSES[loss](logp[:B], logp[B:], ref[:B], ref[B:], beta=beta, lam=lam, neg_as_pos=flags)

def cca_step_loss(policy, reference, tokens, labels, loss="cca", beta=0.1, lam=10.0,
                  uncond_ratio=0.1, collisions="positive", generator=None):
    """cca_batch_loss for this file's GPT: model(tokens, labels) gives logits (B, N, V)."""
    def logp_of(model):
        return lambda x, c: sequence_logprob(model(x, c), x)
    return cca_batch_loss(logp_of(policy), logp_of(reference), tokens, labels,
                          reference.config.num_classes, loss, beta, lam, uncond_ratio,
                          collisions, generator)

# -------------------------------------------------------------------------------------------------
# 6. Training: the optimiser and its schedule, batches, one loop, the stages. Their settings
#    (every default: PRESETS and COMMON) sit below the banner, under "Settings".

def adamw(model, lr, weight_decay):
    """AdamW with decay on matrices only (nanoGPT), betas (0.9, 0.95) as in LlamaGen and CCA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

def cosine_lr(base, steps, warmup_frac, floor):
    """nanoGPT's get_lr as a function of the step: linear warm-up, cosine decay, then the floor."""
    warmup = max(int(steps * warmup_frac), 1)

    def lr_at(step):
        if step < warmup:                                    # 1) linear warm-up to base
            return base * ((step + 1) / warmup)
        if step >= steps:                                    # 3) past the end: floor * base
            return base * floor
        progress = (step - warmup) / max(steps - warmup, 1)  # 2) cosine from base to floor * base
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr_at

def batch_indices(n, batch_size, step, seed):
    """The rows of batch `step`: a fresh permutation each epoch, a pure function of (seed, step), so
    a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    epoch_seed = seed * 7919 + epoch  # distinct for every (seed, epoch < 7919)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))
    return perm[i * batch_size:(i + 1) * batch_size]

class Hooks:
    """How train_loop meets checkpoints and other processes: one process, nothing saved. The
    command line passes a Saves (see Plumbing), which resumes, saves every few steps and on
    Ctrl-C, and under torchrun wraps the model in DDP, shards batches and averages the logs."""

    def wrap(self, model, find_unused_parameters=False):
        return model  # the model as a training step calls it
    def shard(self, batch):
        return batch  # this process's rows of a global batch
    def average(self, stats):
        return stats  # the global batch's numbers, from this process's
    def restore(self, name, model, optimizer, num_steps):
        return 0, []  # (first step, history so far)
    def after_step(self, model, optimizer, history, num_steps):
        pass  # nothing to save (Saves: a periodic save)
    def not_finite(self, name, step):
        return FloatingPointError(f"[{name}] non-finite loss at step {step}")  # the error to raise
    def interrupted(self, name, model, optimizer, history, clean):
        return KeyboardInterrupt()  # Ctrl-C: the error to raise (clean: no half-made step)

def train_loop(name, model, optimizer, num_steps, lr_at, batch_loss, seed, device,
               precision=None, grad_clip=None, hooks=Hooks()):
    """The loop every stage shares (minGPT's Trainer.run): seed -> lr -> loss -> backward -> clip ->
    step -> log. batch_loss(step) -> (loss, stats dict); lr_at(step) -> learning rate.

    Each step reseeds torch from (seed, step), so a resumed run ends with the weights of an
    uninterrupted one (on CPU). precision: "bf16" runs the forward pass under bf16 autocast, "fp32"
    does not, None picks (bf16 on CUDA). grad_clip: the largest gradient norm (None: no clip).
    Returns the history of logs."""
    start, history = hooks.restore(name, model, optimizer, num_steps)
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=name,
               dynamic_ncols=True)
    updating = False
    try:
        for step in bar:
            torch.manual_seed(seed * 1_000_003 + step)  # distinct while step < 1,000,003
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with autocast(device, precision):
                loss, stats = batch_loss(step)
            stats = {k: float(v) for k, v in stats.items()}  # 0-d tensors or floats
            logged = hooks.average({"loss": loss.item(), **stats})
            if not math.isfinite(logged["loss"]):
                raise hooks.not_finite(name, step)
            updating = True  # from here to the log, a Ctrl-C would leave a half-made step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            history.append({"step": step, **logged})
            updating = False
            bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items()}, refresh=False)
            hooks.after_step(model, optimizer, history, num_steps)
    except KeyboardInterrupt:
        bar.close()
        raise hooks.interrupted(name, model, optimizer, history, clean=not updating)
    bar.close()
    return history

def train_tokenizer(data, settings, seed, device, hooks=Hooks()):
    """The VQ tokenizer: reconstruction + VQ losses, Adam, the rate on a cosine (no warm-up) to
    vq_lr_floor x vq_lr. The first vq_ae_warmup x vq_steps steps train a plain autoencoder and the
    codebook starts at their end. Why: a fresh encoder maps most patches to a few near-equal
    vectors, so codes set on them collide (in CIFAR-10's steps 3-20 a batch used 57-70% of the
    codes); after 100 steps of features its outputs spread, and every batch after uses >= 98%."""
    X = to_float(data["x_train"])                                         # (N, C, H, W), on CPU
    vq_config = VQConfig(X.size(1), settings["vq_hidden"], settings["codebook_size"],
                         settings["code_dim"], l2_norm=settings["vq_l2_norm"])
    model = VQTokenizer(vq_config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings["vq_lr"])
    warmup = round(settings["vq_ae_warmup"] * settings["vq_steps"])
    net = hooks.wrap(model, find_unused_parameters=warmup > 0)  # no codebook in the warm-up

    def batch_loss(step):
        x = X[batch_indices(len(X), settings["vq_batch"], step, seed)]  # the global batch, on CPU
        if step < warmup:                                   # the autoencoder warm-up: no codes
            x = hooks.shard(x).to(device)
            mse = F.mse_loss(net(x, quantize=False)[0].float(), x)
            return mse, {"mse": mse.item()}
        # At the warm-up's end: data-driven codebook init. Then every step (as Jukebox does),
        # restart the codes this batch leaves unused: with restarts every 100 steps, CIFAR-10's
        # usage fell from 98% to about 10% in between, codes left behind by the moving encoder
        with torch.no_grad():  # on the global batch, so that every rank makes the same restart
            z_e = model.encoder(x.to(device))
            codes = model.quantize(z_e).flatten()
            used = torch.bincount(codes, minlength=settings["codebook_size"])
            dead = torch.ones_like(used, dtype=torch.bool) if step == warmup else used == 0
            model.restart_codes(z_e, dead)
        x = hooks.shard(x).to(device)                                     # this rank's rows
        recon, vq_loss, indices, _ = net(x)
        mse = F.mse_loss(recon.float(), x)
        usage = codebook_stats(indices, settings["codebook_size"])[0]
        return mse + vq_loss, {"mse": mse.item(), "usage": usage}

    lr_at = cosine_lr(settings["vq_lr"], settings["vq_steps"], 0.0, settings["vq_lr_floor"])
    history = train_loop("tokenizer", model, opt, settings["vq_steps"], lr_at, batch_loss, seed,
                         device, settings["precision"], settings["grad_clip"], hooks)
    return {"model": model.state_dict(), "vq_config": asdict(model.config), "history": history}

@torch.no_grad()
def encode_all(tokenizer, x_uint8, device, batch=1000):
    """uint8 images (N, H, W, C) -> int16 token sequences (N, h*w) in raster order, the order the
    GPT reads; computed once per tokenizer."""
    out = []
    for i in range(0, len(x_uint8), batch):
        grid = tokenizer.encode(to_float(x_uint8[i:i + batch]).to(device))  # (b, h, w)
        out.append(rearrange(grid, "b h w -> b (h w)").short().cpu())
    return torch.cat(out)

def train_gpt(tokens, labels, num_classes, settings, seed, device, hooks=Hooks()):
    """Pretraining: next-token cross-entropy, the class replaced by the null class K with
    probability cond_dropout (that is what makes CFG possible later)."""
    gpt_config = GPTConfig(settings["codebook_size"], num_classes, tokens.size(1),
                           settings["n_layer"], settings["n_head"], settings["n_embd"],
                           settings["dropout"])
    model = GPT(gpt_config).to(device)
    opt = adamw(model, settings["lr"], settings["weight_decay"])
    net = hooks.wrap(model)
    B = min(settings["batch_size"], len(tokens))

    def batch_loss(step):
        idx = batch_indices(len(tokens), B, step, seed)
        x = tokens[idx].long().to(device)                                  # (B, N)
        y = labels[idx].to(device)                                         # (B,)
        dropped = torch.rand(len(y), device=device) < settings["cond_dropout"]
        y = torch.where(dropped, num_classes, y)                           # the null class
        x, y = hooks.shard(x), hooks.shard(y)                              # this rank's rows
        logits = net(x, y)                                                 # (B, N, V)
        return F.cross_entropy(logits.float().flatten(0, 1), x.flatten()), {}

    lr_at = cosine_lr(settings["lr"], settings["steps"], settings["lr_warmup"],
                      settings["lr_floor"])
    history = train_loop("pretrain", model, opt, settings["steps"], lr_at, batch_loss, seed,
                         device, settings["precision"], settings["grad_clip"], hooks)
    return {"model": model.state_dict(), "gpt_config": asdict(gpt_config), "history": history}

def finetune_cca(base, tokens, labels, settings, seed, device, hooks=Hooks()):
    """CCA (or a baseline): the policy starts from the pretrained weights, the reference is a frozen
    copy; dropout is off in both (eval mode), so that every gap is exactly 0 at step 0. The rate
    is constant by default (cca_lr_warmup 0, cca_lr_floor 1): a short pass near the reference."""
    policy = copy.deepcopy(base).eval()
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    opt = adamw(policy, settings["cca_lr"], settings["weight_decay"])
    net = hooks.wrap(policy)  # the frozen reference is never wrapped
    B = min(settings["cca_batch_size"] or settings["batch_size"], len(tokens))  # = negatives' pool
    steps = max(math.ceil(settings["cca_epochs"] * len(tokens) / B), 1)

    def batch_loss(step):  # under torchrun, negatives come from each rank's rows, as officially
        idx = hooks.shard(batch_indices(len(tokens), B, step, seed + 1))  # +1: not pretraining's
        x = tokens[idx].long().to(device)
        y = labels[idx].to(device)
        return cca_step_loss(net, reference, x, y, settings["loss"], settings["beta"],
                             settings["lam"], settings["uncond_ratio"], settings["collisions"])

    lr_at = cosine_lr(settings["cca_lr"], steps, settings["cca_lr_warmup"],
                      settings["cca_lr_floor"])
    history = train_loop("cca", policy, opt, steps, lr_at, batch_loss, seed, device,
                         settings["precision"], settings["grad_clip"], hooks)
    return {"model": policy.state_dict(), "gpt_config": asdict(policy.config), "history": history}

# -------------------------------------------------------------------------------------------------
# 7. Evaluation: a small classifier is the judge (Inception: not downloadable, not made for digits)

@torch.no_grad()
def classify(classifier, images, device, batch=500):
    """uint8 NHWC numpy or float (B, C, H, W) tensor -> (features (B, F), probabilities (B, K)),
    on CPU. A classifier with `flip_average` (the shipped RGB judges) sees each image and its
    mirror and averages both (flip test-time averaging, as the fast CIFAR-10 recipes do)."""
    classifier.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        x = (to_float(x) if isinstance(x, np.ndarray) else x).to(device)
        views = [x, x.flip(3)] if getattr(classifier, "flip_average", False) else [x]
        f = [classifier.features(v).float() for v in views]
        p = [F.softmax(classifier.head(fv).float(), -1) for fv in f]
        feats.append((sum(f) / len(f)).cpu())
        probs.append((sum(p) / len(p)).cpu())
    return torch.cat(feats), torch.cat(probs)

def fid_from_features(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):
    |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2), with tr (Sa Sb)^1/2 computed as
    sum sqrt(eig(Sa^1/2 Sb Sa^1/2)) (symmetric, stable)."""
    a, b = a.double(), b.double()
    D = a.size(1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(D, D)  # reshape: with D = 1, cov is a scalar
    cov_b = torch.cov(b.T).reshape(D, D)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()

def inception_score(probs):
    """exp E_x KL(p(y|x) || p(y)): K for confident, balanced predictions; 1 if all get one class."""
    p = probs.double().clamp(min=1e-12)
    return math.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().item())

def precision_recall(real, fake, k=3):
    """k-NN precision and recall (Kynkäänniemi et al., 2019): a sample is 'covered' when it lies
    within the distance from some point of the other set to that point's k-th nearest neighbour
    in its own set."""
    k = min(k, len(real) - 1, len(fake) - 1)  # tiny sets: the k-th neighbour must exist
    def radii(x):
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values        # +1: skip the point itself
    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)                                        # (Nf, Nr)
    precision = (d <= r_real[None]).any(1).float().mean().item()
    recall = (d.T <= r_fake[None]).any(1).float().mean().item()
    return precision, recall

def evaluate(images, labels, classifier, real_features, device, k=3):
    """Score generated images (float (B, C, H, W) in [0, 1], or uint8 NHWC) made for `labels` (B,):
    conditional accuracy, FID against `real_features` (the test set), classifier IS, and k-NN
    precision/recall against an equally large random subset of the real features."""
    feats, probs = classify(classifier, images, device)
    labels = torch.as_tensor(labels).cpu()
    order = torch.randperm(len(real_features), generator=torch.Generator().manual_seed(0))
    subset = real_features[order[:len(feats)]]
    precision, recall = precision_recall(subset, feats, k)
    return {"accuracy": probs.argmax(1).eq(labels).float().mean().item(),
            "fid": fid_from_features(feats, real_features), "is": inception_score(probs),
            "precision": precision, "recall": recall}

def balanced_labels(n, num_classes, device="cpu"):
    return torch.arange(n, device=device) % num_classes

def sample_images(model, tokenizer, labels, cfg_scale, grid, settings, device, seed, batch=500):
    """Images (B, C, H, W) for `labels`, with token grids of shape `grid` (h, w), generated in
    batches of `batch` with one seeded generator; returns (images, seconds per image)."""
    gen = torch.Generator(device).manual_seed(seed)
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(labels), batch):
        with autocast(device, settings.get("precision")):
            tokens = generate(model, labels[i:i + batch], cfg_scale, settings["temperature"],
                              settings["top_k"], settings["top_p"], generator=gen)  # (b, h*w)
        grids = rearrange(tokens, "b (h w) -> b h w", h=grid[0], w=grid[1])  # raster order
        images.append(tokenizer.decode(grids).float())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(images), (time.perf_counter() - t0) / len(labels)

class Judge:
    """Scores sets of eval_samples balanced, seeded samples (evaluate); a row is eval_seeds sets."""

    def __init__(self, classifier, data, tokenizer, grid, settings, device, seed,
                 name="classifier"):
        self.classifier = classifier
        self.name = name
        self.data = data
        self.tokenizer = tokenizer
        self.grid = grid
        self.settings = settings
        self.device = device
        self.seed = seed
        self.row_seeds = range(seed, seed + settings.get("eval_seeds", 1))  # a table row's seeds
        self.real = classify(classifier, data["x_test"], device)[0]
        self.labels = balanced_labels(settings["eval_samples"], len(data["classes"]), device)

    def __call__(self, model, cfg_scale, seed=None, n=None):
        """One set of samples (seed, n: by default the run's seed and eval_samples) scored."""
        seed = self.seed if seed is None else seed
        num_classes = len(self.data["classes"])
        labels = self.labels if n is None else balanced_labels(n, num_classes, self.device)
        images, sec = sample_images(model, self.tokenizer, labels, cfg_scale, self.grid,
                                    self.settings, self.device, seed)
        scores = evaluate(images, labels, self.classifier, self.real, self.device)
        return {**scores, "sec_per_image": sec}

    def row(self, model, cfg_scale):
        """A table row: the mean and std over the sets of samples."""
        return mean_and_std([self(model, cfg_scale, seed) for seed in self.row_seeds])

    def real_row(self):
        """The real floor, over as many draws of training images as a row has sets of samples."""
        return mean_and_std([self.real_floor(seed) for seed in self.row_seeds])

    def real_floor(self, seed=None):
        """Real training images, scored like samples: the best a generator can hope for at this
        count. ceil(n / K) images per class, interleaved class by class."""
        n, y, K = self.settings["eval_samples"], self.data["y_train"], len(self.data["classes"])
        rng = np.random.default_rng(self.seed if seed is None else seed)
        per_class = [rng.permutation(np.flatnonzero(y == c))[:math.ceil(n / K)] for c in range(K)]
        rounds = range(max(map(len, per_class)))
        idx = np.array([p[i] for i in rounds for p in per_class if i < len(p)], dtype=np.int64)[:n]
        scores = evaluate(self.data["x_train"][idx], y[idx], self.classifier, self.real,
                          self.device)
        return {**scores, "sec_per_image": None}

def mean_and_std(runs):
    """Scores of several sets of samples [{metric: value}] -> {metric: mean, metric_std: sample
    standard deviation (ddof 1; None for a single set)}.

    >>> mean_and_std([{"fid": 1.0}, {"fid": 2.0}, {"fid": 3.0}])
    {'fid': 2.0, 'fid_std': 1.0}
    """
    out = {}
    for metric in runs[0]:
        values = [scores[metric] for scores in runs]
        if values[0] is None:  # e.g. no sampling time for real images
            out[metric] = out[f"{metric}_std"] = None
            continue
        out[metric] = float(np.mean(values))
        out[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out

def best_cfg_scale(score, candidates):
    """The CFG scale with the lowest FID among `candidates`, score(w) -> {"fid": ..., ...}.
    Returns (best w, {w: fid})."""
    fids = {w: score(w)["fid"] for w in candidates}
    return min(fids, key=fids.get), fids

# -------------------------------------------------------------------------------------------------
# 8. The pipeline: where the command line meets sections 1-7. Each stage takes the Pipeline (flags,
#    settings, data, what earlier stages made) and caches its checkpoint under --out (run_stage).

def run(args):
    """The whole pipeline, stage by stage (the figures' and the sweep's stages are in Plumbing)."""
    pipeline = setup(args)
    stages = [stage_tokenizer, stage_tokens, stage_pretrain, stage_samples]
    stages += [stage_cca, stage_compare] if args.cca else []
    stages += [stage_judge] if args.eval or args.sweep else []
    stages += [stage_eval] if args.eval else []
    stages += [stage_sweep] if args.sweep else []
    for stage in stages:
        stage(pipeline)

def stage_tokenizer(pipeline):
    """Stage 1, the VQ tokenizer, with its test-set report and a reconstruction grid."""
    settings, data, device = pipeline.settings, pipeline.data, pipeline.device
    keys = ["vq_hidden", "codebook_size", "code_dim", "vq_steps", "vq_batch", "vq_lr",
            "vq_lr_floor", "vq_ae_warmup", "vq_l2_norm", "precision"]
    made_with = {"data": pipeline.data_id, "seed": pipeline.seed, **pick(settings, keys)}
    build = functools.partial(train_tokenizer, data, settings, pipeline.seed, device)
    ckpt = run_stage(pipeline, "tokenizer", "tokenizer.pt", made_with, build)
    tokenizer = VQTokenizer(VQConfig(**ckpt["vq_config"])).to(device).eval()
    tokenizer.load_state_dict(ckpt["model"])
    tokenizer.id = ckpt["id"]  # the token cache and the GPT record which tokenizer they came from
    report_tokenizer(pipeline, tokenizer, ckpt["history"])  # test scores, code usage, a figure
    pipeline.tokenizer = tokenizer

def stage_tokens(pipeline):
    """Stage 2, the token cache: the GPT never sees pixels again. {"train": (N, h*w), "test": ..}"""
    tokenizer, data, device = pipeline.tokenizer, pipeline.data, pipeline.device

    def build(hooks):
        return {s: encode_all(tokenizer, data[f"x_{s}"], device) for s in ("train", "test")}
    pipeline.tokens = run_stage(pipeline, "tokens", "tokens.pt", {"tokenizer": tokenizer.id}, build)

def stage_pretrain(pipeline):
    """Stage 3, pretraining with condition dropout; prints the size and bits per token."""
    settings, tokens, device = pipeline.settings, pipeline.tokens, pipeline.device
    keys = ["n_layer", "n_head", "n_embd", "dropout", "steps", "batch_size", "lr", "cond_dropout",
            "precision"]
    made_with = {"tokenizer": pipeline.tokenizer.id, "seed": pipeline.seed, **pick(settings, keys)}
    build = functools.partial(train_gpt, tokens["train"], pipeline.y_train, pipeline.K, settings,
                              pipeline.seed, device)
    pipeline.base_ckpt = run_stage(pipeline, "pretrain", "gpt.pt", made_with, build)
    base = pipeline.models["base"] = load_gpt(pipeline.base_ckpt, device)
    report_pretrain(pipeline, base)  # its size, bits per token on train and test tokens

def stage_cca(pipeline):
    """Stage 5, the CCA fine-tune (or a baseline) of the pretrained model, cached by settings."""
    pipeline.models[pipeline.settings["loss"]] = finetuned(pipeline, pipeline.settings)

def finetuned(pipeline, settings):
    """The pretrained model fine-tuned with `settings` (the run's, or a sweep's λ)."""
    keys = ["loss", "beta", "lam", "cca_epochs", "cca_lr", "cca_lr_warmup", "cca_lr_floor",
            "cca_batch_size", "uncond_ratio", "collisions", "precision"]
    made_with = {"base": pipeline.base_ckpt["id"], "seed": pipeline.seed, **pick(settings, keys)}
    build = functools.partial(finetune_cca, pipeline.models["base"], pipeline.tokens["train"],
                              pipeline.y_train, settings, pipeline.seed, pipeline.device)
    ckpt = run_stage(pipeline, "cca", cca_name(settings) + ".pt", made_with, build)
    return load_gpt(ckpt, pipeline.device)

def stage_judge(pipeline):
    """Stage 6, the judge (--judge; see judge_for) and the Judge that samples and scores with it."""
    classifier, name = judge_for(pipeline)
    pipeline.judge = Judge(classifier, pipeline.data, pipeline.tokenizer, pipeline.grid,
                           pipeline.settings, pipeline.device, pipeline.seed, name)

def stage_eval(pipeline):
    """Stage 7, the table (metrics.json): real images, then each model without and with CFG, and
    the base model at its best CFG scale, the paper's comparison for CCA without guidance."""
    settings, judge, seed = pipeline.settings, pipeline.judge, pipeline.seed
    w_best = best_cfg_for(pipeline)
    rows = {"real (train images)": judge.real_row()}
    for name, model in pipeline.models.items():
        rows[f"{name}, no guidance"] = judge.row(model, 1.0)
        rows[f"{name}, CFG {settings['cfg']:g}"] = judge.row(model, settings["cfg"])
        if name == "base":
            rows[f"base, best CFG (w = {w_best:g})"] = judge.row(model, w_best)
    sets = settings["eval_seeds"]
    seeds = f"seeds {seed}..{seed + sets - 1}, mean ± std" if sets > 1 else f"seed {seed}"
    print(f"\n[eval] {settings['eval_samples']} samples per row and set, balanced over classes; "
          f"{sets} sets ({seeds}); FID/IS/precision/recall in the features of the judge "
          f"({judge.name}), against the {len(pipeline.data['x_test'])} test images")
    print_table(rows)
    metrics = {"rows": rows, "settings": settings, "seed": seed,
               "device": str(pipeline.device), "processes": WORLD, "best_cfg": w_best,
               "judge": judge.name, "classifier_accuracy": pipeline.reports["judge_accuracy"],
               "tokenizer": pipeline.reports["tokenizer"]}
    write_json(metrics, pipeline.path("metrics.json"))
    print(f"[eval] wrote {pipeline.path('metrics.json')}")

# =================================================================================================
# Plumbing: nothing below is needed to understand CCA. Settings validation, torchrun, reports,
# checkpoints and resume, the reference judges (loading, training, choosing), figures and files,
# the command line. The speed benchmark is a script of its own: tools/bench.py.
# =================================================================================================

# Porting kit: with section 5 and sequence_logprob, all that CCA needs in another codebase (torch
# only; docs/porting.md says what to copy). Every source of randomness switched off, and restored;
# the step-0 self-check.

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout)

def _random_settings(model):
    """(module name, module, attribute, value) for every nonzero source of randomness that a walk
    over the modules finds: the p of dropout modules, and every float attribute of a module whose
    name says drop (drop-path's drop_prob, LlamaGen's attn_dropout_p and its label embedder's
    dropout_prob, VAR's cond_drop_rate and attn_drop)."""
    found = []
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            probability = name == "p" if isinstance(module, DROPOUT_MODULES) else "drop" in name
            if probability and isinstance(value, float) and value != 0.0:
                found.append((path, module, name, value))
    return found

@contextlib.contextmanager
def no_randomness(*models):
    """Inside the block every source of randomness found in `models` is 0 (the modes stay as they
    are: LlamaGen's teacher-forcing pass needs train mode); on leaving, every value is restored.
    Yields what it changed, as (module name, attribute, old value). Wrap a whole fine-tune in it
    for a dropout-off recipe, or only the step-0 self-check for a keep-dropout one. Randomness
    written inline (a literal F.dropout(x, 0.1), torch.rand in forward) is not found: the
    self-check is what catches it."""
    found = [entry for model in models for entry in _random_settings(model)]
    try:
        for _, module, name, _ in found:
            setattr(module, name, 0.0)
        yield [(path, name, value) for path, _, name, value in found]
    finally:
        for _, module, name, value in found:
            setattr(module, name, value)

def step0_self_check(policy_logp, ref_logp, tokens, labels, num_classes, *, lam, models=(),
                     uncond_ratio=0.1):
    """Run before the first update, the policy holding the reference's weights. Every source of
    randomness in `models` is switched off for the check and restored after it. Returns the
    largest |log pθ - log pφ| over the 2B rows (exactly 0 when the two passes are deterministic)
    and loss - log 2·(1 + mean w)/max(λ, 1), w = 1 on flagged rows and λ elsewhere (0 up to float
    rounding, ~1e-7). A nonzero gap: randomness is left, or the weights or callables differ."""
    with no_randomness(*models), torch.no_grad():
        logp, ref, flags = paired_logps(policy_logp, ref_logp, tokens, labels, num_classes,
                                        uncond_ratio)
    B = len(flags)
    loss, _ = cca_loss(logp[:B], logp[B:], ref[:B], ref[B:], beta=1.0, lam=lam, neg_as_pos=flags)
    weight = torch.where(flags, 1.0, float(lam))
    closed_form = math.log(2) * (1 + weight.mean().item()) / max(lam, 1.0)
    return (logp - ref).abs().max().item(), loss.item() - closed_form

# -------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix: the CLI prints it as one line and exits with status 2."""
    exit_code = 2

class Interrupted(UserError):
    exit_code = 130  # Ctrl-C, after saving what can be resumed

# The settings: COMMON, then the preset's values; a flag of the same name (--vq-steps: vq_steps)
# overrides both. Steps are optimizer steps; epochs are passes over the training set.
PRESETS = {
    "micro": dict(  # the tests: seconds
        vq_hidden=16, codebook_size=32, code_dim=8, vq_steps=40, vq_batch=64, vq_lr=2e-3,
        vq_ae_warmup=0.1, n_layer=1, n_head=2, n_embd=32, dropout=0.0, steps=40, batch_size=32,
        lr=3e-3, cca_epochs=0.05, cca_lr=1e-3, judge_width=8, judge_epochs=0.3,
        eval_samples=100, samples_per_class=4, sweep_cfg=[1.0, 2.0], sweep_lam=[1.0, 10.0]),
    "cpu": dict(  # a laptop: the default run in about 7 minutes on 2 cores
        vq_hidden=64, codebook_size=256, code_dim=32, vq_steps=800, vq_batch=128, vq_lr=2e-3,
        vq_l2_norm=False,  # on MNIST the plain lookup beat the l2 one by 0.4-0.9 dB PSNR
        n_layer=4, n_head=4, n_embd=128, dropout=0.0, steps=800, batch_size=64, lr=2e-3,
        cca_lr=2e-4, eval_samples=1000),
    "cpu_rgb": dict(  # a laptop, RGB images (CIFAR-10): the whole pipeline in about an hour
        # its tokenizer: 24.1 dB PSNR in 5 minutes. docs/results.md's 25 dB one (twice the codes and
        # the batch, more steps, the plain lookup) costs over half the hour: no better samples
        vq_hidden=64, codebook_size=512, code_dim=32, vq_steps=2000, vq_batch=128, vq_lr=2e-3,
        # the hour's training on a small GPT trained long: 4 x 128 (5.5 epochs, 1.35 of CCA) beat
        # 6 x 192 and 8 x 256 GPTs given the same time, with and without guidance (docs/results.md)
        vq_lr_floor=0.1, n_layer=4, n_head=4, n_embd=128, dropout=0.0, steps=4300, batch_size=64,
        lr=1e-3, cca_epochs=1.35, cca_lr=1e-4, eval_samples=1000,
        lam=30.0,  # CIFAR-10 wants a stronger push than MNIST's: λ 30 beat 10 and 3
        sweep_cfg=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0]),  # CFG's best: w 6-12
    "gpu": dict(  # one GPU
        vq_hidden=128, codebook_size=512, code_dim=32, vq_steps=8000, vq_batch=256, vq_lr=1e-3,
        vq_lr_floor=0.1, n_layer=8, n_head=8, n_embd=384, dropout=0.1,
        steps=20000, batch_size=256, lr=6e-4, cca_lr=6e-5, eval_samples=5000),
}
COMMON = dict(  # the same for every preset unless it says otherwise
    vq_lr_floor=1.0,     # the tokenizer's final rate / vq_lr (1.0: constant)
    vq_ae_warmup=0.05,   # share of vq_steps spent as a plain autoencoder (see train_tokenizer)
    vq_l2_norm=True,     # look codes up by cosine (ViT-VQGAN, LlamaGen)
    cond_dropout=0.1,    # LlamaGen's share of null-class rows in pretraining
    cfg=2.0,             # the best FID of the CFG sweep on the default data (README)
    temperature=1.0, top_k=None, top_p=None,
    lr_warmup=0.05,      # share of the pretraining steps that warm the rate up (nanoGPT's idea)
    lr_floor=0.1,        # pretraining's final rate / lr (nanoGPT's min_lr = lr / 10)
    weight_decay=0.05,   # AdamW's, on matrices only, for pretraining and CCA
    grad_clip=1.0,       # max gradient norm of a GPT or tokenizer step (nanoGPT's)
    loss="cca",
    beta=0.1,            # β·N ≈ 5 for N = 49 tokens: the log-ratio of a sequence, not a token
    lam=10.0,            # kept after the MNIST sweeps (README); the paper tunes λ per model
    uncond_ratio=0.1,    # the official code's: the pretraining condition-dropout rate
    collisions="positive", cca_epochs=1.0,
    cca_lr_warmup=0.0,   # share of the CCA steps that warm the rate up (0: none)
    cca_lr_floor=1.0,    # CCA's final rate / cca_lr, on a cosine (1.0: the official constant rate)
    cca_batch_size=None,  # None: pretraining's batch_size (each row's negative is another row's)
    judge_width=32,      # JudgeNet's w: 4w = 128-d features, Inception's role
    judge_epochs=None,   # None: JUDGE_RECIPE's epochs for the images' channels
    eval_seeds=3,        # sets of samples per table row: the fewest that give a spread
    precision=None, samples_per_class=10,
    sweep_cfg=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0], sweep_lam=[1.0, 3.0, 10.0, 30.0, 100.0])
# The judge's recipe, after the fast CIFAR-10 ones (Page's ResNet-9; Jordan's airbench): Nesterov
# SGD, the rate up linearly over `warmup` of the steps then down linearly to 0, weight decay on
# weights only, label smoothing, random shifts of up to `shift` pixels, flips for RGB only
JUDGE_RECIPE = dict(batch=256, lr=0.2, momentum=0.9, weight_decay=5e-4, label_smoothing=0.2,
                    warmup=0.2, shift={1: 2, 3: 4},
                    epochs={1: 2.0, 3: 16.0})  # by channels: digits need few passes

# Settings and input validation

@dataclass
class Pipeline:
    """What the stages share; the stages fill in the fields after `out`."""
    args: argparse.Namespace
    settings: dict
    device: torch.device
    data: dict
    data_id: str                  # fingerprint(data): the tokenizer records it
    seed: int
    K: int                        # classes
    grid: tuple                   # the token grid (h, w)
    y_train: torch.Tensor
    out: str
    reports: dict = field(default_factory=dict)  # what the stages measured (tokenizer, judge)
    models: dict = field(default_factory=dict)   # {"base": GPT, "cca" (or --loss): GPT}
    tokenizer: nn.Module = None
    tokens: dict = None           # {"train": (N, h*w), "test": ...}
    base_ckpt: dict = None        # gpt.pt: the fine-tunes record its id
    panels: dict = None           # {title: sample images} of the comparison figure
    judge: "Judge" = None

    def path(self, file):
        return os.path.join(self.out, file)

def pick(settings, keys):
    return {k: settings[k] for k in keys}

def setup(args):
    """The Pipeline: device, settings, data, --out; each mistake said before a download or write."""
    device = init_distributed(pick_device(args.device))
    if args.pretrained and args.dataset not in (None, "tiny"):
        raise UserError("--pretrained uses the checkpoints shipped in tiny_data/, made on the "
                        "default dataset: drop --dataset")
    if args.pretrained and not os.path.isdir(PRETRAINED):
        raise UserError(f"no reference checkpoints in {PRETRAINED}: see tiny_data/README.md to "
                        f"make them")
    # the reference checkpoints were made with the cpu preset
    preset = "cpu" if args.pretrained and not args.preset else chosen_preset(args, device)
    settings = checked_settings(args, preset, device)
    if RANK > 0:  # under torchrun rank 0 loads (and downloads) first, the others read its files
        from_rank0()
    data = load_dataset(args.dataset, args.data_root)
    if RANK == 0:
        from_rank0()
    name = dataset_name(args.dataset)
    out = args.out or os.path.join("runs", name)
    try:  # now, not after an hour of training
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"--out {out} is not a writable folder ({e.strerror})")
    if args.pretrained and RANK == 0:
        import shutil
        for file in sorted(os.listdir(PRETRAINED)):  # checkpoints already in --out are kept
            if not os.path.exists(os.path.join(out, file)):
                shutil.copy(os.path.join(PRETRAINED, file), out)
    from_rank0()  # the others wait for rank 0's copies
    (H, W, C), K = data["x_train"].shape[1:], len(data["classes"])
    grid = (H // 4, W // 4)  # the token grid: 4x downsampling
    ddp_note = (f"; {WORLD} processes (DDP), global batch {settings['batch_size']}"
                if WORLD > 1 else "")
    print(f"minicca: {name}: {len(data['x_train'])} train / {len(data['x_test'])} test images "
          f"{H}x{W}x{C}, {K} classes; device {device}; preset {preset}; out {out}{ddp_note}")
    if device.type == "cpu" and settings["n_embd"] >= 384:  # before hours go
        print("warning: a GPU-sized run on a CPU takes hours; --preset cpu and cpu_rgb are sized "
              "for a CPU", file=sys.stderr)
    return Pipeline(args, settings, device, data, fingerprint(data), args.seed, K, grid,
                    torch.from_numpy(data["y_train"]), out)

STAGES = ["tokenizer", "tokens", "pretrain", "cca"]  # --retrain X redoes X and the stages after it
REDO = {**{stage: STAGES[i:] for i, stage in enumerate(STAGES)},
        "classifier": ["classifier"], "all": STAGES + ["classifier"]}

def pick_device(name):
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if here["cuda"] else "mps" if here["mps"] else "cpu"
    if not here.get(name, True):
        what = {"cuda": "no CUDA GPU is", "mps": "Apple's MPS backend is not"}[name]
        raise UserError(f"--device {name}: {what} available here (use --device auto or cpu)")
    return torch.device(name)

def chosen_preset(args, device):
    """--preset, else gpu on a GPU; on a CPU, cpu_rgb for RGB images, else cpu."""
    if args.preset or device.type != "cpu":
        return args.preset or "gpu"
    return "cpu_rgb" if image_channels(args.dataset) == 3 else "cpu"

def image_channels(dataset):
    """1 or 3 before any download (the flags are checked first); None: an unreadable .npz."""
    if dataset in (None, "tiny", "mnist", "cifar10"):
        return 3 if dataset == "cifar10" else 1
    try:  # an .npz is local: read the smaller split (load_dataset says what is wrong with it)
        with np.load(dataset, allow_pickle=False) as f:
            shape = f["x_test"].shape
    except Exception:
        return None
    return shape[3] if len(shape) == 4 else 1

RULES = [  # (what a setting must be, the test, the settings; None, an unset option, passes)
    ("> 0", lambda v: v > 0, ["beta", "batch_size", "steps", "vq_steps", "vq_batch", "cca_epochs",
                              "judge_epochs", "eval_samples", "eval_seeds", "samples_per_class",
                              "lr", "cca_lr", "n_layer", "n_embd", "n_head", "cca_batch_size"]),
    (">= 0", lambda v: v >= 0, ["lam", "cfg", "temperature", "seed", "save_every"]),
    (">= 1", lambda v: v >= 1, ["top_k"]),
    (">= 2", lambda v: v >= 2, ["codebook_size"]),
    ("in [0, 1)", lambda v: 0 <= v < 1, ["uncond_ratio", "cond_dropout", "dropout",
                                         "cca_lr_warmup"]),
    ("in [0, 1]", lambda v: 0 <= v <= 1, ["cca_lr_floor"]),
    ("in (0, 1]", lambda v: 0 < v <= 1, ["top_p"]),
]

def checked_settings(args, preset, device):
    """The preset overridden by every flag given; the first rule broken is the error."""
    settings = {**COMMON, **PRESETS[preset]}
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    settings["precision"] = resolve_precision(settings["precision"], device)
    values = {**settings, "seed": args.seed, "save_every": args.save_every}
    for what, test, keys in RULES:
        for key in keys:
            if values[key] is not None and not test(values[key]):
                raise UserError(f"--{key.replace('_', '-')} must be {what}, got {values[key]}")
    if settings["n_embd"] % settings["n_head"]:
        raise UserError(f"--n-embd must be a multiple of --n-head, got {settings['n_embd']}")
    for key in ("batch_size", "cca_batch_size"):
        if (settings[key] or 0) % WORLD:
            raise UserError(f"--{key.replace('_', '-')} must be a multiple of the {WORLD} "
                            f"processes, got {settings[key]}")
    return settings

def validate_arrays(arrays, source):
    """The arrays checked and normalised: NHWC uint8 images, int64 labels, class names (str)."""
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"{source}: missing arrays {missing} (x_train, y_train, x_test, y_test)")
    out = {}
    for split in ("train", "test"):
        x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
        if x.ndim == 3:
            x = x[..., None]  # NHW -> NHWC
        check_split(x, y, split, source)
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise UserError(f"{source}: train images {out['x_train'].shape[1:]} and test images "
                        f"{out['x_test'].shape[1:]} differ in shape")
    top = int(max(out["y_train"].max(), out["y_test"].max()))
    names = np.asarray(arrays.get("classes", range(top + 1)))  # by default, the labels
    if names.ndim != 1:
        raise UserError(f"{source}: classes must be a 1-D array of class names")
    classes = [str(c) for c in names]
    low = int(min(out["y_train"].min(), out["y_test"].min()))
    if low < 0 or top >= len(classes):
        raise UserError(f"{source}: labels must lie in 0..{len(classes) - 1}, found {low}..{top}")
    counts = np.bincount(out["y_train"], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:  # a class the model never sees would still get a row, a null embedding, a score
        named = ", ".join(empty) if len(empty) <= 12 else ", ".join(empty[:10]) + ", ..."
        raise UserError(f"{source}: {len(empty)} of {len(classes)} classes have no training "
                        f"images ({named}); relabel to 0..K-1 or drop them from `classes`")
    out["classes"] = classes
    return out

def check_split(x, y, split, source):
    """One split's images (N, H, W, C) and labels (N,): one rule per line."""
    if x.dtype != np.uint8:
        raise UserError(f"{source}: x_{split} has dtype {x.dtype}; expected uint8 images (0..255)")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{source}: x_{split} has shape {x.shape}; expected NHW or NHWC with 1 "
                        f"or 3 channels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{source}: y_{split} must be a 1-D array of integer labels, got {y.dtype} "
                        f"{y.shape}")
    if len(x) == 0:
        raise UserError(f"{source}: the {split} split is empty")
    if len(x) != len(y):
        raise UserError(f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} "
                        f"labels")
    if x.shape[1] % 4 or x.shape[2] % 4 or min(x.shape[1:3]) < 4:
        raise UserError(f"{source}: images are {x.shape[1]}x{x.shape[2]}; height and width must "
                        f"be multiples of 4")

def _load_npz(name):
    if not name.endswith(".npz"):
        raise UserError(f"unknown --dataset {name!r}: use mnist, cifar10, or a path to an .npz "
                        f"file")
    if not os.path.isfile(name):
        raise UserError(f"--dataset {name}: no such file")
    try:
        with np.load(name, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"--dataset {name}: not a readable .npz file ({type(e).__name__})")

def _load_torchvision(kind, root):
    import torchvision  # imported here: it is slow to import and only these two datasets need it
    cls = getattr(torchvision.datasets, kind)
    hint = (f"{kind} is not under --data-root {root!r} and could not be downloaded. Place the "
            f"files there (torchvision layout, e.g. {os.path.join(root, kind, 'raw')}) or pass "
            f"--dataset path/to/data.npz")
    out = {}
    for split in ("train", "test"):
        try:
            ds = cls(root, train=split == "train", download=False)
        except Exception:  # not there: try to download it, as torchvision users expect
            try:
                ds = cls(root, train=split == "train", download=True)
            except Exception as e:
                first_line = str(e).splitlines()[0][:120] if str(e) else ""
                raise UserError(f"{hint} ({type(e).__name__}: {first_line})")
        out[f"x_{split}"], out[f"y_{split}"] = np.asarray(ds.data), np.asarray(ds.targets)
    return {**out, "classes": list(ds.classes)}

def fingerprint(data):
    """Sizes, image shape and a hash of the arrays: a checkpoint records the data it was made on."""
    import hashlib
    h = hashlib.md5()
    for k in ("x_train", "y_train", "x_test", "y_test"):
        h.update(np.ascontiguousarray(data[k]).tobytes())
    shape = "x".join(map(str, data["x_train"].shape[1:]))
    return f"{len(data['x_train'])}+{len(data['x_test'])}x{shape}:{h.hexdigest()[:10]}"

def dataset_name(dataset):
    """'tiny', 'mnist', 'cifar10', or an .npz file's name without folder and extension."""
    return os.path.splitext(os.path.basename(dataset or "tiny"))[0]

# Several processes (`torchrun --nproc_per_node=N minicca.py ...`; one process: RANK 0, WORLD 1,
# every helper a no-op). Every rank runs the whole program with the same seed on its share of each
# global batch; DDP averages gradients, so the weights stay identical. Sampling and evaluation are
# not split: every rank draws the same seeded samples and rank 0 reports them (no barrier waits).
RANK, WORLD = 0, 1

def init_distributed(device):
    """Detect torchrun from its environment (as nanoGPT does) and join its process group: NCCL
    with one GPU per rank, Gloo on CPU. Only rank 0 prints, draws progress bars and writes files."""
    global RANK, WORLD, tqdm
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return device
    if device.type == "mps":
        raise UserError("several processes need CUDA GPUs (NCCL) or the CPU (Gloo), not MPS")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    RANK, WORLD = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if RANK > 0:  # quiet: no prints, no progress bars
        sys.stdout = open(os.devnull, "w")
        tqdm = functools.partial(tqdm, disable=True)
    return device

def from_rank0(obj=None):
    """rank 0's `obj` on every rank; also a barrier (the others wait here for rank 0's writes)."""
    if WORLD > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj

def rank0_only(write):
    """Decorates a function that writes a file: under torchrun only rank 0 calls it."""
    @functools.wraps(write)
    def maybe_write(*args, **kwargs):
        return write(*args, **kwargs) if RANK == 0 else None
    return maybe_write

def autocast(device, precision=None):
    """bf16: matmuls and convolutions in bfloat16 (CUDA or CPU); fp32: none; None: bf16 on CUDA."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

def resolve_precision(precision, device):
    return precision or ("bf16" if device.type == "cuda" else "fp32")

# Reports

@torch.no_grad()
def bits_per_token(model, tokens, labels, device, batch=500):
    """Mean negative log-likelihood per token, in bits, with the true classes (no dropout)."""
    model.eval()
    total = 0.0
    for i in range(0, len(tokens), batch):
        x = tokens[i:i + batch].long().to(device)
        y = labels[i:i + batch].to(device)
        total -= sequence_logprob(model(x, y), x).sum().item()
    return total / tokens.numel() / math.log(2)

@torch.no_grad()
def tokenizer_report(tokenizer, x_uint8, device, batch=1000):
    """Test-set reconstruction MSE and PSNR (images in [0, 1]), codebook usage and perplexity."""
    mse, codes = 0.0, []
    for i in range(0, len(x_uint8), batch):
        x = to_float(x_uint8[i:i + batch]).to(device)
        idx = tokenizer.encode(x)
        mse += F.mse_loss(tokenizer.decode(idx), x, reduction="sum").item()
        codes.append(idx.cpu())
    mse /= x_uint8.size
    usage, perplexity = codebook_stats(torch.cat(codes), tokenizer.config.codebook_size)
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    return {"mse": mse, "psnr": psnr, "usage": usage, "perplexity": perplexity}

def report_tokenizer(pipeline, tokenizer, history):
    """Test-set scores (for metrics.json), the training batches' lowest code usage, a figure."""
    data, device = pipeline.data, pipeline.device
    report = pipeline.reports["tokenizer"] = tokenizer_report(tokenizer, data["x_test"], device)
    print(f"[tokenizer] test MSE {report['mse']:.4f}, PSNR {report['psnr']:.2f} dB, codebook "
          f"usage {report['usage']:.0%}, perplexity {report['perplexity']:.0f} of "
          f"{tokenizer.config.codebook_size}")
    quantised = [h for h in history if "usage" in h]  # the steps after any warm-up
    if quantised:
        low = min(quantised, key=lambda h: h["usage"])
        print(f"[tokenizer] share of the codes a training batch used: lowest {low['usage']:.0%} "
              f"(step {low['step']}) of steps {quantised[0]['step']}-{quantised[-1]['step']}")
    x = to_float(data["x_test"][:16]).to(device)
    recon = tokenizer.decode(tokenizer.encode(x))
    save_grid(torch.cat([x, recon]), 16, pipeline.path("tokenizer_recon.png"))

def report_pretrain(pipeline, base):
    tokens, device = pipeline.tokens, pipeline.device
    n_test = len(tokens["test"])
    train_bits = bits_per_token(base, tokens["train"][:n_test], pipeline.y_train[:n_test], device)
    val_bits = bits_per_token(base, tokens["test"], torch.tensor(pipeline.data["y_test"]), device)
    millions = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"[pretrain] {millions:.2f}M parameters; bits/token: train {train_bits:.3f}, "
          f"val {val_bits:.3f}")

# Checkpoints and resume

@rank0_only
def save_checkpoint(obj, path):
    """Atomic: a temporary file, then a rename: a kill at any moment leaves the last good file."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_checkpoint(path, device="cpu", stage="all"):
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        ckpt = e
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is unreadable (truncated or corrupted? {type(ckpt).__name__}): "
                        f"delete it or pass --retrain {stage}")
    return ckpt

def check_made_with(path, saved, wanted, fix):
    """A checkpoint made with other settings is an error naming each difference and the fix."""
    diff = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]
    if diff:
        raise UserError(f"{path} was made with other settings ({'; '.join(diff)}): {fix}")

def run_stage(pipeline, name, file, made_with, build):
    """Load the checkpoint `file` under --out if it was made with the settings `made_with`, else
    build it: build(hooks) -> dict, hooks the Saves of its resumable checkpoint, file.partial."""
    path, args, device = pipeline.path(file), pipeline.args, pipeline.device
    if os.path.exists(path) and name not in args.redo:
        ckpt = load_checkpoint(path, device, name)
        check_made_with(path, ckpt.get("config", {}), made_with,
                        f"pass --retrain {name} to redo it, or use another --out")
        print(f"[{name}] up to date: {path}")
        return ckpt
    torch.manual_seed(args.seed)
    resume = args.resume and name not in args.redo
    ckpt = build(Saves(path + ".partial", made_with, device, args.save_every, resume))
    ckpt.update(config=made_with, id=os.urandom(4).hex())  # downstream stages record this id
    save_checkpoint(ckpt, path)
    if RANK == 0 and os.path.exists(path + ".partial"):
        os.remove(path + ".partial")
    ckpt["id"] = from_rank0(ckpt["id"])  # torchrun: one id; no rank goes on before the file exists
    print(f"[{name}] saved {path}")
    return ckpt

@dataclass
class Saves(Hooks):
    """train_loop's Hooks for the command line: the resumable checkpoint of one stage, `partial`
    (weights, optimizer, step, history and the settings it was made with), and torchrun."""
    partial: str
    made_with: dict
    device: torch.device
    save_every: int
    resume: bool
    start: int = 0

    def wrap(self, model, find_unused_parameters=False):  # the optimizer keeps the bare model
        return model if WORLD == 1 else nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=find_unused_parameters)

    def shard(self, batch):  # rows RANK, RANK + WORLD, ... (DistributedSampler's split)
        return batch[RANK::WORLD]

    def average(self, stats):  # the global batch's numbers, as one process would log them
        if WORLD == 1:
            return stats
        t = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return dict(zip(stats, (t / WORLD).tolist()))

    def restore(self, name, model, optimizer, num_steps):
        """(first step, history so far): from `partial` with --resume, else (0, [])."""
        if not os.path.exists(self.partial):
            return 0, []
        if not self.resume:
            print(f"[{name}] note: {self.partial} holds an interrupted run; pass --resume to "
                  f"continue it. Starting over.")
            return 0, []
        state = load_checkpoint(self.partial, self.device, name)
        check_made_with(self.partial, state["config"], self.made_with,
                        "run without --resume to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.start = state["step"]
        print(f"[{name}] resuming from step {self.start}/{num_steps} ({self.partial})")
        return self.start, state["history"]

    def save(self, model, optimizer, history):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": len(history), "history": history, "config": self.made_with}
        save_checkpoint(state, self.partial)

    def after_step(self, model, optimizer, history, num_steps):
        if self.save_every and len(history) % self.save_every == 0 and len(history) < num_steps:
            self.save(model, optimizer, history)

    def not_finite(self, name, step):
        kept = self.partial if os.path.exists(self.partial) else "no partial checkpoint yet"
        return UserError(f"[{name}] non-finite loss at step {step}; stopped, last good checkpoint "
                         f"kept ({kept}). Try a lower learning rate.")

    def interrupted(self, name, model, optimizer, history, clean):
        """Ctrl-C: save what is complete (never a half-made step); the error to raise."""
        if clean and len(history) > self.start:
            self.save(model, optimizer, history)
        return Interrupted(f"[{name}] interrupted; progress up to the last save is in "
                           f"{self.partial}: rerun the same command with --resume to continue")

# The reference judges: the shipped ones, one trained on a run's own data (--judge train, cached as
# classifier.pt), and the one recipe (JUDGE_RECIPE) for both (tools/make_judge.py made the shipped)

JUDGES = {"mnist": os.path.join(HERE, "tiny_data", "judge_mnist.pt"),
          "cifar10": os.path.join(HERE, "tiny_data", "judge_cifar10.pt")}

def load_judge(name_or_path, device="cpu"):
    """A shipped judge by name (JUDGES) or a file from tools/make_judge.py: a JudgeNet in eval mode,
    float32, on `device`; judge.info says how it was made (classes, image_shape, accuracy, ...)."""
    path = JUDGES.get(name_or_path, name_or_path)
    if not os.path.isfile(path):
        raise UserError(f"no judge file {path} (make one: python tools/make_judge.py --help)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    judge = JudgeNet(**ckpt["judge_config"])
    judge.load_state_dict(ckpt["model"])  # a float16 file still gives float32 weights
    judge.info = ckpt["info"]
    judge.flip_average = judge.info.get("test_accuracy_flip") is not None  # RGB: mirror too
    return judge.to(device).eval()

class JudgeNet(nn.Module):
    """The judge, shaped like Page's ResNet-9 and Jordan's airbench without residuals: a stem, then
    three groups conv -> max-pool -> conv of widths w, 4w, 4w (each conv: BN, GELU); a global max
    pool gives the 4w-d features (Inception's role in FID, precision/recall), a linear head the
    logits. (B, C, H, W) in [0, 1] -> features (B, 4w) -> logits (B, K)."""

    def __init__(self, channels, num_classes, width=32, stem=24):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, width=width, stem=stem)
        layers, prev = conv_bn_gelu(channels, stem), stem
        for w in (width, 4 * width, 4 * width):      # 32x32 -> 16 -> 8 -> 4 (28x28 -> 14 -> 7 -> 3)
            conv, *norm = conv_bn_gelu(prev, w)
            layers += [conv, nn.MaxPool2d(2), *norm, *conv_bn_gelu(w, w)]  # pool, then BN: cheaper
            prev = w
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, num_classes, bias=False)

    def forward(self, x):
        return self.head(self.features(x))

def conv_bn_gelu(i, o):
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.GELU()]

def train_judge(data, epochs=None, width=32, seed=0, device="cpu", hooks=Hooks(),
                recipe=JUDGE_RECIPE, precision=None, name="judge"):
    """A JudgeNet trained on x_train (epochs None: the recipe's), scored on x_test; precision as in
    train_loop. Returns {"model": state dict, "history", "test_accuracy"}."""
    device = torch.device(device)
    X, Y = to_float(data["x_train"]), torch.from_numpy(data["y_train"])
    C = X.size(1)
    epochs = epochs or recipe["epochs"][C]
    fast = torch.channels_last  # measured on CPU: about 1.5x faster than NCHW here
    model = JudgeNet(C, len(data["classes"]), width).to(device, memory_format=fast)
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": rest}]
    opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=True,
                          weight_decay=0.0)
    net = hooks.wrap(model)
    B = min(recipe["batch"], len(X))
    steps = max(round(epochs * (len(X) // B)), 1)
    up, down = recipe["warmup"] * steps, (1 - recipe["warmup"]) * steps

    def lr_at(step):  # linear warm-up, then linear decay to 0
        return recipe["lr"] * min(1, (step + 1) / up, (steps - step) / down)

    def batch_loss(step):  # augmented on the global batch: every rank draws the same shifts
        idx = batch_indices(len(X), B, step, seed)
        x = random_shift(X[idx], pad=recipe["shift"][C])
        if C == 3:
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)
        x, y = hooks.shard(x), hooks.shard(Y[idx])  # BatchNorm: per-rank statistics
        logits = net(x.to(device, memory_format=fast))
        return F.cross_entropy(logits.float(), y.to(device),
                               label_smoothing=recipe["label_smoothing"]), {}

    history = train_loop(name, model, opt, steps, lr_at, batch_loss, seed, device, precision,
                         None, hooks)
    probs = classify(model, data["x_test"], device)[1]
    accuracy = probs.argmax(1).eq(torch.from_numpy(data["y_test"])).float().mean().item()
    return {"model": model.state_dict(), "history": history, "test_accuracy": accuracy}

def random_shift(x, pad):
    """(B, C, H, W): each image shifted by its own offset in [-pad, pad]^2 (reflect padding)."""
    H, W = x.shape[2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, len(x))).tolist()
    return torch.stack([image[:, i:i + H, j:j + W] for image, i, j in zip(padded, dy, dx)])

def judge_for(pipeline):
    """(classifier, name) for --judge: shipped (MNIST's for mnist, tiny, mnist.npz; CIFAR-10's for
    cifar10), train (on this run's images; the default where none is shipped), or a judge file."""
    dataset, settings = dataset_name(pipeline.args.dataset), pipeline.settings
    shipped = JUDGES.get("mnist" if dataset == "tiny" else dataset)
    shipped = shipped if shipped is not None and os.path.exists(shipped) else None
    choice = pipeline.args.judge or ("shipped" if shipped else "train")
    if choice == "train":
        made_with = {"data": pipeline.data_id, "seed": pipeline.seed,
                     **pick(settings, ["judge_width", "judge_epochs", "precision"])}
        build = functools.partial(  # seed + 2: not the GPT's batches
            train_judge, pipeline.data, settings["judge_epochs"], settings["judge_width"],
            pipeline.seed + 2, pipeline.device, precision=settings["precision"], name="classifier")
        ckpt = run_stage(pipeline, "classifier", "classifier.pt", made_with, build)
        classifier = JudgeNet(pipeline.data["x_train"].shape[3], pipeline.K,
                              settings["judge_width"])
        classifier.load_state_dict(ckpt["model"])
        pipeline.reports["judge_accuracy"] = ckpt["test_accuracy"]
        print(f"[classifier] test accuracy {ckpt['test_accuracy']:.2%}")
        return classifier.to(pipeline.device).eval(), "trained here (classifier.pt)"
    if choice == "shipped" and shipped is None:
        raise UserError(f"--judge shipped: there is no shipped judge for {dataset!r} (shipped: "
                        f"{', '.join(JUDGES)}); use --judge train or --judge path/to/judge.pt")
    path = shipped if choice == "shipped" else choice
    classifier = load_judge(path, pipeline.device)
    info, shape = classifier.info, tuple(pipeline.data["x_train"].shape[1:])
    if (tuple(info["image_shape"]), len(info["classes"])) != (shape, pipeline.K):
        raise UserError(f"the judge {path} was made for {len(info['classes'])} classes of "
                        f"{tuple(info['image_shape'])} images, not {pipeline.K} of {shape}: use "
                        f"--judge train")
    name = os.path.relpath(path, HERE) if path.startswith(HERE) else path
    accuracy = info["test_accuracy_flip" if classifier.flip_average else "test_accuracy"]
    pipeline.reports["judge_accuracy"] = accuracy
    views = " with flip averaging" if classifier.flip_average else ""
    print(f"[judge] {name}: test accuracy {accuracy:.2%}{views} (where it was made; see "
          f"tiny_data/README.md)")
    return classifier, name

def best_cfg_for(pipeline):
    """The base model's best CFG scale by FID among sweep_cfg's (w > 1): from this base and judge's
    sweep.json if there is one, else a quick search with half the samples and one seed."""
    settings, judge, base = pipeline.settings, pipeline.judge, pipeline.models["base"]
    candidates = [w for w in settings["sweep_cfg"] if w > 1]
    if os.path.exists(pipeline.path("sweep.json")):
        with open(pipeline.path("sweep.json")) as f:
            sweep = json.load(f)
        done = {p["cfg"]: p for p in sweep["cfg"] if p["cfg"] in candidates}
        same = sweep.get("base") == pipeline.base_ckpt["id"] and sweep.get("judge") == judge.name
        if same and done:
            return best_cfg_scale(lambda w: done[w], list(done))[0]
    n = max(settings["eval_samples"] // 2, 2 * pipeline.K)  # at least 2 samples per class
    w, fids = best_cfg_scale(lambda w: judge(base, w, n=n), candidates)
    print(f"[eval] best CFG scale by FID ({n} samples): w = {w:g} ("
          + ", ".join(f"{c:g}: {fid:.3g}" for c, fid in fids.items()) + ")")
    return w

# The pipeline's figures and the sweep

def stage_samples(pipeline):
    """4. Samples of the base model, guidance-free and with CFG: a row per class."""
    w, base = pipeline.settings["cfg"], pipeline.models["base"]
    pipeline.panels = {"base, no guidance": class_rows(pipeline, base, 1.0),
                       f"base, CFG {w:g}": class_rows(pipeline, base, w)}
    files = ["samples_base.png", f"samples_base_cfg{w:g}.png"]
    for (title, images), file in zip(pipeline.panels.items(), files):
        save_grid(images, pipeline.settings["samples_per_class"], pipeline.path(file))
        print(f"[samples] {title}: {pipeline.path(file)} (a row per class)")

def class_rows(pipeline, model, cfg_scale):
    """samples_per_class images of each class, class by class (the rows of a grid)."""
    labels = torch.arange(pipeline.K, device=pipeline.device)
    labels = labels.repeat_interleave(pipeline.settings["samples_per_class"])
    return sample_images(model, pipeline.tokenizer, labels, cfg_scale, pipeline.grid,
                         pipeline.settings, pipeline.device, pipeline.seed)[0]

def stage_compare(pipeline):
    """The comparison figure: base and fine-tuned model, each without and with CFG."""
    settings = pipeline.settings
    for w in (1.0, settings["cfg"]):
        title = f"{settings['loss']}, " + ("no guidance" if w == 1 else f"CFG {w:g}")
        pipeline.panels[title] = class_rows(pipeline, pipeline.models[settings["loss"]], w)
    file = pipeline.path(f"compare_{cca_name(settings)}.png")
    save_panels(pipeline.panels, settings["samples_per_class"], file,
                f"β={settings['beta']:g}, λ={settings['lam']:g}, rows: classes")
    print(f"[cca] comparison: {file}")

def stage_sweep(pipeline):
    """The paper's Fig. 4 at our scale: CFG scale on the base model against λ of CCA fine-tunes."""
    settings, judge, base = pipeline.settings, pipeline.judge, pipeline.models["base"]
    result = {"cfg": [], "lam": [], "settings": settings, "seed": pipeline.seed,
              "base": pipeline.base_ckpt["id"], "judge": judge.name}
    for w in settings["sweep_cfg"]:
        result["cfg"].append({"cfg": w, **judge.row(base, w)})
        print(f"[sweep] base CFG {w:g}: " + scores_line(result["cfg"][-1]))
    for lam in settings["sweep_lam"]:
        tuned = finetuned(pipeline, {**settings, "lam": lam})
        result["lam"].append({"lam": lam, **judge.row(tuned, 1.0)})
        print(f"[sweep] CCA λ {lam:g}: " + scores_line(result["lam"][-1]))
    write_json(result, pipeline.path("sweep.json"))
    print_table({**{f"base, CFG {p['cfg']:g}": p for p in result["cfg"]},
                 **{f"CCA λ={p['lam']:g}, no guidance": p for p in result["lam"]}})
    plot_sweep(result, pipeline.path("sweep.png"))
    print(f"[sweep] wrote {pipeline.path('sweep.json')} and {pipeline.path('sweep.png')}")

def scores_line(scores):
    return ", ".join(f"{k} {v:.3g}" for k, v in scores.items() if not k.endswith("_std"))

def cca_name(settings):
    """The fine-tune's file name: loss, β, λ, epochs, and the settings below if not the defaults
    (a fine-tune of another learning rate alone has the same name: --retrain cca replaces it)."""
    extra = "" if settings["collisions"] == "positive" else f"_{settings['collisions']}"
    if settings["uncond_ratio"] != COMMON["uncond_ratio"]:
        extra += f"_u{settings['uncond_ratio']:g}"
    if settings["cca_lr_warmup"] or settings["cca_lr_floor"] != 1:  # a schedule: its peak too
        extra += (f"_lr{settings['cca_lr']:g}w{settings['cca_lr_warmup']:g}"
                  f"f{settings['cca_lr_floor']:g}")
    if settings["cca_batch_size"]:
        extra += f"_bs{settings['cca_batch_size']}"
    return (f"cca_{settings['loss']}_b{settings['beta']:g}_l{settings['lam']:g}"
            f"_e{settings['cca_epochs']:g}{extra}")

def load_gpt(ckpt, device):
    model = GPT(GPTConfig(**ckpt["gpt_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()

# Figures and files (rank 0 writes them)

@rank0_only
def save_grid(images, nrow, path):
    import torchvision.utils
    torchvision.utils.save_image(images.float().cpu(), path, nrow=nrow, padding=1, pad_value=0.5)

@rank0_only
def save_panels(panels, nrow, path, title=""):
    """Several image grids side by side, each titled: {title: images (B, C, H, W)}."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend alone
    import torchvision.utils
    fig = Figure(figsize=(3.2 * len(panels), 3.6), layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], panels.items()):
        grid = torchvision.utils.make_grid(imgs.float().cpu(), nrow=nrow, padding=1, pad_value=0.5)
        ax.imshow(rearrange(grid, "c h w -> h w c").numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)

@rank0_only
def plot_sweep(res, file):
    from matplotlib.figure import Figure
    axes = Figure(figsize=(10, 4), layout="tight").subplots(1, 2)
    for ax, (x, y) in zip(axes, [("accuracy", "fid"), ("recall", "precision")]):
        curves = [("cfg", "base + CFG (scale w)", "o-"), ("lam", "CCA, no guidance (λ)", "s-")]
        for key, label, style in curves:
            ax.plot([p[x] for p in res[key]], [p[y] for p in res[key]], style, label=label)
            for p in res[key]:
                ax.annotate(f"{p[key]:g}", (p[x], p[y]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel=x, ylabel=y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].figure.savefig(file, dpi=120)

@rank0_only
def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)

def print_table(rows):
    """The evaluation table, as Markdown (so README tables are this output, pasted)."""
    cols = ["accuracy", "fid", "is", "precision", "recall", "sec_per_image"]
    print("| setting | " + " | ".join(cols) + " |")
    print("|---" + "|---:" * len(cols) + "|")
    for name, row in rows.items():
        cells = [format_metric(col, row.get(col), row.get(f"{col}_std")) for col in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")

def format_metric(col, value, std=None):
    """Three decimals, FID three significant digits, seconds (no spread) as 1.23e-04; ± the std."""
    if value is None:
        return "-"
    if col == "sec_per_image":
        return f"{value:.2e}"
    spec, std_spec = (".3g", ".2g") if col == "fid" else (".3f", ".3f")
    return f"{value:{spec}}" + ("" if std is None else f" ± {std:{std_spec}}")

# The command line

# The flags that set the setting of the same name (--vq-steps: vq_steps), by group: (flag, type or
# argparse's keywords, what it sets). Left unset they keep the preset's value; --help states the
# defaults from COMMON and PRESETS.
SETTING_FLAGS = {
    "tokenizer": [
        ("vq-steps", int, "tokenizer optimizer steps"), ("vq-hidden", int, "tokenizer conv width"),
        ("vq-batch", int, "tokenizer batch size"),
        ("codebook-size", int, "codes in the codebook = the GPT's vocabulary"),
        ("vq-l2-norm", dict(action=argparse.BooleanOptionalAction), "look up codes by cosine")],
    "pretraining": [
        ("n-layer", int, "transformer blocks"), ("n-head", int, "attention heads"),
        ("n-embd", int, "width"), ("dropout", float, "dropout in the GPT"),
        ("steps", int, "pretraining optimizer steps"),
        ("batch-size", int, "GPT and CCA batch size (under torchrun: the global batch)"),
        ("lr", float, "pretraining peak learning rate (cosine schedule)"),
        ("cond-dropout", float, "probability of the null class in pretraining")],
    "sampling": [
        ("cfg", float, "CFG scale w (LlamaGen's convention: 1 = no guidance)"),
        ("temperature", float, "sampling temperature (0 = greedy)"),
        ("top-k", int, "sample among the k most likely tokens"),
        ("top-p", float, "nucleus sampling: the smallest set with this mass"),
        ("samples-per-class", int, "columns of the sample grids")],
    "CCA fine-tuning": [
        ("loss", dict(choices=list(LOSSES)), "cca, or the paper's baselines"),
        ("beta", float, "β, which scales the log-likelihood ratio (see README)"),
        ("lam", float, "λ, the weight of the negatives: the diversity-fidelity knob"),
        ("cca-epochs", float, "passes over the training tokens"),
        ("cca-lr", float, "fine-tuning learning rate (with a schedule: its peak)"),
        ("cca-lr-warmup", float, "share of the CCA steps that warm the rate up"),
        ("cca-lr-floor", float, "final rate / --cca-lr, reached on a cosine (1: constant)"),
        ("cca-batch-size", int, "CCA batch size (None: --batch-size)"),
        ("uncond-ratio", float, "share of rows with the null class on both branches"),
        ("collisions", dict(choices=["positive", "mask", "resample"]),
         "what to do when the rolled negative class equals the true class")],
    "evaluation": [
        ("eval-samples", int, "samples per table row, balanced over classes"),
        ("eval-seeds", int, "sets of samples per table row (sampling seeds): mean ± std"),
        ("judge-epochs", float, "epochs of a judge trained here (--judge train; None: "
         f"{JUDGE_RECIPE['epochs'][1]:g} for one channel, {JUDGE_RECIPE['epochs'][3]:g} for RGB)"),
        ("sweep-cfg", dict(type=float, nargs="+"), "CFG scales of the sweep"),
        ("sweep-lam", dict(type=float, nargs="+"), "λ values of the sweep, one fine-tune each")],
}

def defaults_of(key):
    """A setting's defaults as --help states them: COMMON's value, then each preset's own."""
    own = "; ".join(f"{name} {values[key]}" for name, values in PRESETS.items() if key in values)
    if key not in COMMON:
        return f"preset: {own}"
    return f"default {COMMON[key]}" + (f"; {own}" if own else "")

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" would hide that the preset decides
        return action.help if action.default is None else super()._get_help_string(action)

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="minicca.py", formatter_class=_Help,
        description="Train a VQ tokenizer and a class-conditional GPT, sample with and without "
                    "CFG, fine-tune with CCA, and compare. Every stage is cached under --out and "
                    "skipped when up to date. Flags left unset take their value from --preset.",
        epilog="Several GPUs: torchrun --standalone --nproc_per_node=N minicca.py [flags] trains "
               "every stage with DDP (NCCL; Gloo on CPU); --batch-size is then the global batch.")
    p.add_argument("command", nargs="?", default="run", choices=["run", "tokenizer"],
                   help="run: the pipeline; tokenizer: its first stage alone (a later run in "
                   "the same --out reuses it)")
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default=None, help="mnist | cifar10 | path/to/data.npz "
                   "(default: the MNIST subset in tiny_data/, offline)")
    g.add_argument("--data-root", default="data",
                   help="where torchvision's MNIST/CIFAR10 files are or go")
    g.add_argument("--out", default=None, help="output folder (default runs/<dataset>)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="micro (tests), cpu (a laptop), cpu_rgb (a laptop, RGB images such as "
                   "CIFAR-10), gpu (one GPU); default: gpu on a GPU; on a CPU cpu_rgb for RGB "
                   "data, cpu otherwise")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16: autocast in training and sampling (default on CUDA); fp32: full "
                   "precision (default elsewhere); bf16 on a CPU runs the GPU path's arithmetic")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--retrain", action="append", default=[], choices=list(REDO),
                   help="redo this stage and those after it even if its checkpoint is up to date")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted stage from its .partial save")
    g.add_argument("--save-every", type=int, default=200,
                   help="save a resumable checkpoint every N steps (0: never)")
    g.add_argument("--pretrained", action="store_true",
                   help="start from the reference checkpoints in tiny_data/pretrained (default "
                   "dataset only), copied into --out without replacing checkpoints already there; "
                   "stages whose checkpoint fits are skipped")
    groups = {name: p.add_argument_group(name) for name in SETTING_FLAGS}
    for name, flags in SETTING_FLAGS.items():
        for flag, kind, text in flags:
            typed = kind if isinstance(kind, dict) else dict(type=kind)
            help = f"{text} ({defaults_of(flag.replace('-', '_'))})"
            groups[name].add_argument(f"--{flag}", help=help, **typed)
    groups["CCA fine-tuning"].add_argument(
        "--cca", action=argparse.BooleanOptionalAction, default=True,
        help="fine-tune the pretrained model with CCA (or --loss) after pretraining")
    g = groups["evaluation"]
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="score the models with the judge and print the table (metrics.json)")
    g.add_argument("--judge", default=None, metavar="shipped|train|PATH.pt",
                   help="the classifier that scores: shipped (the reference judge in tiny_data/, "
                   "one feature space for every run on mnist, cifar10 and the tiny subset), "
                   "train (one trained on this run's data), or a judge file (default: shipped "
                   "where there is one, else train)")
    g.add_argument("--sweep", action="store_true",
                   help="CFG-scale sweep and λ sweep (sweep.json, sweep.png)")
    args = p.parse_args(argv)
    args.redo = sorted({s for r in args.retrain for s in REDO[r]})
    return args

def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "tokenizer":
            stage_tokenizer(setup(args))  # the first stage alone
        else:
            run(args)
    except UserError as e:
        if RANK == 0 or not isinstance(e, Interrupted):  # torchrun: rank 0 alone reports Ctrl-C
            print(f"minicca: error{f' (rank {RANK})' if RANK else ''}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("minicca: interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:  # torchrun, Gloo's "closed/reset by peer": the failed rank said why
        if RANK == 0 or "by peer" not in str(e):
            raise
        print(f"minicca: rank {RANK} stopped: another rank failed", file=sys.stderr)
        sys.exit(1)
    finally:
        if WORLD > 1:
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
