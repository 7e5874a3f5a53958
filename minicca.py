"""
minicca: Condition Contrastive Alignment (CCA) for class-conditional autoregressive image models, in one file.

CCA (Chen et al., ICLR 2025, arXiv 2410.09347) fine-tunes an AR image model so that plain sampling, with no
classifier-free guidance (CFG), reaches CFG's quality at half the sampling cost. This file does the whole job
on MNIST / CIFAR-10 / your own .npz, and reads top to bottom in data-flow order:

    1. data           load_dataset: uint8 images NHWC + integer labels, validated
    2. tokenizer      VQTokenizer: conv encoder -> nearest codebook entry -> conv decoder (28x28 -> 7x7 tokens)
    3. model          GPT: class token first, then the image tokens in raster order; class K is the null class
    4. sampling       generate: KV cache, CFG as one 2B batch (cfg_logits), top-k / top-p
    5. loss           cca_loss (and the dpo_loss / unlearning_loss baselines): pure functions of log-likelihoods
    6. training       tokenizer, token cache, pretraining with condition dropout, CCA fine-tuning
    7. evaluation     a small classifier as the judge: accuracy, FID, IS, precision/recall in its features
    8. CLI            python minicca.py [--dataset mnist|cifar10|file.npz] [--preset micro|cpu|gpu] ...

Cut on purpose: no perceptual/GAN tokenizer losses, no 2D/rotary positions, no multi-scale (VAR) models,
no Inception FID. See README.md for scope and limits.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_DATA = os.path.join(HERE, "tiny_data", "mnist_tiny.npz")
PRETRAINED = os.path.join(HERE, "tiny_data", "pretrained")


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it as one line and exits with status 2 (no traceback)."""


# ----------------------------------------------------------------------------------------------------------
# 1. Data: every source becomes the same dict of uint8 NHWC images and int64 labels

def validate_arrays(arrays, source):
    """Check a dict with x_train, y_train, x_test, y_test (and optional classes); return it normalised."""
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"{source}: missing arrays {missing}; expected x_train, y_train, x_test, y_test")
    out = {}
    for split in ("train", "test"):
        x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
        if x.dtype != np.uint8:
            raise UserError(f"{source}: x_{split} has dtype {x.dtype}; expected uint8 images (0..255)")
        if x.ndim == 3:
            x = x[..., None]  # NHW -> NHWC
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise UserError(f"{source}: x_{split} has shape {x.shape}; expected NHW or NHWC with 1 or 3 channels")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{source}: y_{split} must be a 1-D array of integer labels, got {y.dtype} {y.shape}")
        if len(x) == 0:
            raise UserError(f"{source}: the {split} split is empty")
        if len(x) != len(y):
            raise UserError(f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if x.shape[1] % 4 or x.shape[2] % 4:
            raise UserError(f"{source}: images are {x.shape[1]}x{x.shape[2]}; height and width must be multiples of 4")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise UserError(f"{source}: train images {out['x_train'].shape[1:]} and test images "
                        f"{out['x_test'].shape[1:]} differ in shape")
    top = int(max(out["y_train"].max(), out["y_test"].max()))
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(top + 1)]
    low = int(min(out["y_train"].min(), out["y_test"].min()))
    if low < 0 or top >= len(classes):
        raise UserError(f"{source}: labels must lie in 0..{len(classes) - 1}, found {low}..{top}")
    out["classes"] = classes
    return out


def _load_torchvision(kind, root):
    import torchvision  # imported here: it is slow to import and only these two datasets need it
    cls = getattr(torchvision.datasets, kind)
    hint = (f"{kind} is not under --data-root {root!r} and could not be downloaded. Place the files there "
            f"(torchvision layout, e.g. {os.path.join(root, kind, 'raw')}) or pass --dataset path/to/data.npz")
    splits = {}
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except Exception:  # not there: try to download it, as torchvision users expect
            try:
                ds = cls(root, train=train, download=True)
            except Exception as e:
                raise UserError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        x, y = np.asarray(ds.data), np.asarray(ds.targets)
        splits["train" if train else "test"] = (x, y)
    return {"x_train": splits["train"][0], "y_train": splits["train"][1], "x_test": splits["test"][0],
            "y_test": splits["test"][1], "classes": list(ds.classes)}


def load_dataset(name=None, data_root="data"):
    """'mnist' | 'cifar10' (torchvision) | a path to an .npz | None (the MNIST subset shipped in tiny_data/).

    Returns {"x_train": uint8 (N, H, W, C), "y_train": int64 (N,), "x_test", "y_test", "classes": [str]}.
    """
    if name in (None, "tiny"):
        name = TINY_DATA
    if name in ("mnist", "cifar10"):
        return validate_arrays(_load_torchvision({"mnist": "MNIST", "cifar10": "CIFAR10"}[name], data_root), name)
    if not name.endswith(".npz"):
        raise UserError(f"unknown --dataset {name!r}: use mnist, cifar10, or a path to an .npz file")
    if not os.path.isfile(name):
        raise UserError(f"--dataset {name}: no such file")
    try:
        with np.load(name, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"--dataset {name}: not a readable .npz file ({type(e).__name__})")
    return validate_arrays(arrays, name)


def to_float(x_uint8):
    """uint8 (B, H, W, C) numpy -> float (B, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2).float().div(255)


# ----------------------------------------------------------------------------------------------------------
# 2. VQ tokenizer: images -> grids of discrete codes (van den Oord et al., 2017), 4x downsampling

@dataclass
class VQConfig:
    channels: int = 1          # 1 for grayscale, 3 for RGB
    hidden: int = 64           # conv width
    codebook_size: int = 256   # the GPT's vocabulary
    code_dim: int = 32
    commitment: float = 0.25   # weight of the commitment term ||z_e - sg[e]||^2 only


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


def vq_losses(z_e, z_q):
    """The two VQ-VAE terms. The commitment weight belongs on the second one only (a bug copied across many
    VQGAN codebases puts it on the first)."""
    codebook = F.mse_loss(z_q, z_e.detach())    # ||sg[z_e] - e||^2: moves the codes toward the encoder
    commitment = F.mse_loss(z_e, z_q.detach())  # ||z_e - sg[e]||^2: keeps the encoder near its codes
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
            nn.ConvTranspose2d(c.hidden, c.channels, 4, 2, 1))     # (B, C, H, W), linear: a sigmoid saturates
        self.codebook = nn.Embedding(c.codebook_size, c.code_dim)

    def quantize(self, z_e):
        """(B, d, h, w) -> indices of the nearest codes (B, h, w)."""
        B, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)                       # (B*h*w, d)
        codes = self.codebook.weight                                         # (K, d)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return dist.argmin(1).view(B, h, w)

    def lookup(self, indices):
        return self.codebook(indices).permute(0, 3, 1, 2)                   # (B, d, h, w)

    def forward(self, images):
        """images (B, C, H, W) in [0, 1] -> (reconstruction, vq loss, indices (B, h, w), z_e)."""
        z_e = self.encoder(images)
        indices = self.quantize(z_e)
        z_q = self.lookup(indices)
        codebook, commitment = vq_losses(z_e, z_q)
        z_st = z_e + (z_q - z_e).detach()  # straight-through: forward uses z_q, backward copies grads to z_e
        return self.decoder(z_st), codebook + self.config.commitment * commitment, indices, z_e

    @torch.no_grad()
    def encode(self, images):
        """(B, C, H, W) in [0, 1] -> LongTensor (B, H/4, W/4)."""
        return self.quantize(self.encoder(images))

    @torch.no_grad()
    def decode(self, indices):
        """LongTensor (B, h, w) -> images (B, C, 4h, 4w) in [0, 1] (the linear output clamped here)."""
        return self.decoder(self.lookup(indices)).clamp(0, 1)

    @torch.no_grad()
    def restart_codes(self, z_e, dead):
        """Codebook init and dead-code restarts: move the `dead` (bool (K,)) codes onto random encoder outputs."""
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.size(1))
        pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)
        self.codebook.weight[dead] = flat[pick]


def codebook_stats(indices, codebook_size):
    """Fraction of codes used and the perplexity of their empirical distribution (codebook_size at best)."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    return (counts > 0).float().mean().item(), torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()


# ----------------------------------------------------------------------------------------------------------
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
        self.n_head, self.dropout = c.n_head, c.dropout
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x, cache=None):
        """x (B, T, C). With a cache (a list [k, v] for this layer), x is the next position only (T = 1):
        its keys and values are appended and it attends to every cached position, so no mask is needed."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)      # (B, nh, T, hd)
                   for t in self.qkv(x).split(C, dim=2))
        if cache is not None:
            assert T == 1, "cached decoding feeds one position at a time"
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)     # (B, nh, t+1, hd)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.n_embd), SelfAttention(c)
        self.ln2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd),
                                 nn.Dropout(c.dropout))

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

    def _run(self, x, start=0, cache=None):
        x = self.drop(x + self.pos_emb[:, start:start + x.size(1)])               # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.head(self.ln_f(x))                                            # (B, T, V)

    def forward(self, tokens, labels):
        """tokens (B, T <= N), labels (B,) -> logits (B, T, V): logits[:, i] is the distribution of token i
        given the class and tokens[:, :i]. The last token is never an input (teacher forcing)."""
        x = torch.cat([self.class_emb(labels)[:, None], self.tok_emb(tokens[:, :-1])], dim=1)  # (B, T, C)
        return self._run(x)

    def decode_step(self, prev_tokens, labels, cache):
        """Logits (B, V) of the next position, appending to `cache` (a list with one [] per layer to start).
        prev_tokens (B,) is the token chosen at the previous position (ignored at position 0)."""
        t = len(cache[0]) and cache[0][0].size(2)
        x = self.class_emb(labels)[:, None] if t == 0 else self.tok_emb(prev_tokens)[:, None]  # (B, 1, C)
        return self._run(x, start=t, cache=cache)[:, 0]

    def new_cache(self):
        return [[] for _ in self.blocks]


def sequence_logprob(logits, tokens):
    """log p(x|c) = sum over the N tokens of log p(x_i | c, x_<i): (B, N, V), (B, N) -> (B,), in float32."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
    return -nll.view(tokens.shape).sum(1)


# ----------------------------------------------------------------------------------------------------------
# 4. Sampling, with classifier-free guidance as one doubled batch

def cfg_logits(cond_logits, uncond_logits, scale):
    """LlamaGen's convention: l_u + w (l_c - l_u). w = 1 is no guidance; w = 1 + s targets p(x|c)[p(x|c)/p(x)]^s
    per token (VAR's t is w - 1). Mixing logits or log-probs gives the same samples (they differ by a constant)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:  # nucleus: keep the smallest set with mass >= top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p          # mass before this token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, labels, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None, use_cache=True,
             generator=None):
    """Sample token grids (B, N) for `labels` (B,). cfg_scale == 1 runs only the B conditional rows; any other
    scale runs [conditional; unconditional] as one 2B batch, so CFG costs twice the compute per token."""
    was_training = model.training
    model.eval()
    B, N, K = len(labels), model.config.block_size, model.config.num_classes
    guided = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, K)]) if guided else labels       # (R,) R = 2B or B
    out = torch.zeros(B, N, dtype=torch.long, device=labels.device)
    cache = model.new_cache() if use_cache else None
    for t in range(N):
        if use_cache:
            prev = out[:, t - 1].repeat(2 if guided else 1) if t > 0 else None
            logits = model.decode_step(prev, rows, cache)                               # (R, V)
        else:  # full recomputation of the prefix: the naive reference the KV cache is tested against
            logits = model(out[:, :t + 1].repeat(2 if guided else 1, 1), rows)[:, -1]  # (R, V)
        logits = logits.float()
        if guided:
            logits = cfg_logits(logits[:B], logits[B:], cfg_scale)                      # (B, V)
        out[:, t] = sample_token(logits, temperature, top_k, top_p, generator)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. The CCA loss and its baselines: pure functions of per-sequence log-likelihoods, copy them anywhere

def _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos):
    shapes = {t.shape for t in (policy_pos, policy_neg, ref_pos, ref_neg)}
    if len(shapes) != 1 or policy_pos.dim() != 1:
        raise ValueError(f"expected four (B,) tensors of per-sequence log-likelihoods, got shapes {shapes}")
    if neg_as_pos is None:
        return torch.zeros_like(policy_pos, dtype=torch.bool)
    if neg_as_pos.shape != policy_pos.shape:
        raise ValueError(f"neg_as_pos has shape {tuple(neg_as_pos.shape)}, expected {tuple(policy_pos.shape)}")
    return neg_as_pos.bool()


def _reward_stats(gap_pos, gap_neg, flagged):
    real = ~flagged if (~flagged).any() else torch.ones_like(flagged)  # contrastive rows only, when there are any
    gp, gn = gap_pos.detach()[real], gap_neg.detach()[real]
    return {"reward_acc": (gp > gn).float().mean().item(), "margin": (gp - gn).mean().item(),
            "gap_pos": gp.mean().item(), "gap_neg": gn.mean().item()}


def cca_loss(policy_pos, policy_neg, ref_pos, ref_neg, *, beta, lam, neg_as_pos=None, normalize=True):
    """Condition Contrastive Alignment loss (Chen et al., 2025, Eq. 12), with the official code's semantics.

        L = -log σ(β·[log pθ(x|c) - log pφ(x|c)]) - λ·log σ(-β·[log pθ(x|c⁻) - log pφ(x|c⁻)])

    Inputs are (B,) float tensors of sequence log-likelihoods (summed over tokens): the trainable policy pθ and
    the frozen reference pφ, on true pairs (x, c) ("pos") and mismatched pairs (x, c⁻) ("neg").
    beta (> 0) scales the log-ratio into a logit: the optimum is pθ ∝ pφ·[p(x|c)/p(x)]^(1/β) per class, so 1/β
    plays the role of the CFG strength s; it multiplies a sum over N tokens, so smaller N wants a larger β.
    lam (>= 0) weights the negatives; at small β it acts as a threshold "keep x where p(c|x) > λ·p(c)", the
    diversity-fidelity knob. neg_as_pos (bool (B,), optional) flags negative rows that are really positives
    (the null class on both branches, or c⁻ == c): they get -log σ(+β·gap) with weight 1. Both terms are
    averaged over the batch; with `normalize` the sum is divided by max(λ, 1), as the official code does.
    Returns (loss, stats) with stats = reward accuracy, margin, mean gap_pos, mean gap_neg (floats).

    Example: at zero gaps every log σ(0) = -log 2, so the loss is (1 + λ)·log 2 / max(λ, 1):
        >>> z = torch.zeros(4)
        >>> loss, stats = cca_loss(z, z, z, z, beta=0.1, lam=10.0)
        >>> round(loss.item(), 4)   # 11 * 0.6931 / 10
        0.7625
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the log-likelihood ratio), got {beta}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0 (the weight of the negative term), got {lam}")
    flagged = _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos)
    gap_pos = policy_pos - ref_pos                      # log pθ(x|c)/pφ(x|c): the implicit reward is β·gap
    gap_neg = policy_neg - ref_neg                      # log pθ(x|c⁻)/pφ(x|c⁻)
    pos_term = -F.logsigmoid(beta * gap_pos)            # -log σ(β·gap_pos): raise the true pair's likelihood
    sign = torch.where(flagged, 1.0, -1.0)              # flagged rows are positives: -log σ(+β·gap)
    weight = torch.where(flagged, 1.0, float(lam))      # true negatives weigh λ, flagged rows 1
    neg_term = -weight * F.logsigmoid(sign * beta * gap_neg)  # -λ·log σ(-β·gap_neg): lower the wrong pair's
    loss = pos_term.mean() + neg_term.mean()            # logsigmoid is stable: finite at gaps of ±1e6
    if normalize:
        loss = loss / max(lam, 1.0)                     # the official rescale, for stability with grad clipping
    return loss, _reward_stats(gap_pos, gap_neg, flagged)


def dpo_loss(policy_pos, policy_neg, ref_pos, ref_neg, *, beta, lam=None, neg_as_pos=None, normalize=True):
    """DPO baseline: -log σ(β·(gap_pos - gap_neg)). Controls only the *relative* likelihood, which lets both
    fall (it collapses LlamaGen in the paper). Flagged rows are no contrast and are left out. lam is unused."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    flagged = _check_pairs(policy_pos, policy_neg, ref_pos, ref_neg, neg_as_pos)
    gap_pos, gap_neg = policy_pos - ref_pos, policy_neg - ref_neg
    loss = -F.logsigmoid(beta * (gap_pos - gap_neg))
    return loss[~flagged].sum() / max(int((~flagged).sum()), 1), _reward_stats(gap_pos, gap_neg, flagged)


def unlearning_loss(policy_pos, policy_neg, ref_pos, ref_neg, *, beta=None, lam, neg_as_pos=None, normalize=True):
    """Unlearning baseline: -log pθ(x|c) + λ·log pθ(x|c⁻) (flagged rows count as positives, weight 1).
    Written with gaps (the reference is a constant), so it is 0 at initialisation with the same gradient. It is
    unbounded below; CCA's sigmoids are what switch off pairs that are already solved. beta is unused."""
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


def contrastive_labels(labels, num_classes, uncond_ratio=0.1, collisions="positive", generator=None):
    """Pair each image with a wrong class from the same batch, as the official code does (roll by one, so a row
    is never paired with its own label index). Returns (pos_labels, neg_labels, neg_as_pos, keep):
    - collisions (c⁻ == c, ~1/K of rows): "positive" flags them (official), "mask" drops those rows
      (keep = False), "resample" draws c⁻ = (c + U{1..K-1}) mod K, a guaranteed mismatch;
    - uncond_ratio of the rows get the null class on both branches, flagged as positives: this keeps the
      unconditional model alive, so CFG still works after CCA."""
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
    keep = ~collide | uncond if collisions == "mask" else torch.ones_like(collide)
    neg_as_pos = uncond | (collide if collisions != "mask" else torch.zeros_like(collide))
    return pos, neg, neg_as_pos, keep


def cca_step_loss(policy, reference, tokens, labels, loss="cca", beta=0.1, lam=10.0, uncond_ratio=0.1,
                  collisions="positive", generator=None):
    """One fine-tuning batch: the policy runs on 2B rows with gradients, the frozen reference on 2B without."""
    pos, neg, flags, keep = contrastive_labels(labels, policy.config.num_classes, uncond_ratio, collisions,
                                               generator)
    tokens, pos, neg, flags = tokens[keep], pos[keep], neg[keep], flags[keep]
    both_tokens, both_labels = torch.cat([tokens, tokens]), torch.cat([pos, neg])       # (2B, N), (2B,)
    logp = sequence_logprob(policy(both_tokens, both_labels), both_tokens)               # (2B,)
    with torch.no_grad():
        ref = sequence_logprob(reference(both_tokens, both_labels), both_tokens)
    B = len(tokens)
    return LOSSES[loss](logp[:B], logp[B:], ref[:B], ref[B:], beta=beta, lam=lam, neg_as_pos=flags)
