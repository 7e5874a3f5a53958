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
import functools
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
    exit_code = 2


class Interrupted(UserError):
    exit_code = 130  # Ctrl-C, after saving what can be resumed


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
        if x.shape[1] % 4 or x.shape[2] % 4 or min(x.shape[1:3]) < 4:
            raise UserError(f"{source}: images are {x.shape[1]}x{x.shape[2]}; height and width must be multiples of 4")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise UserError(f"{source}: train images {out['x_train'].shape[1:]} and test images "
                        f"{out['x_test'].shape[1:]} differ in shape")
    top = int(max(out["y_train"].max(), out["y_test"].max()))
    if "classes" in arrays and np.asarray(arrays["classes"]).ndim != 1:
        raise UserError(f"{source}: classes must be a 1-D array of class names")
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
    beta (> 0) scales the log-ratio into a logit: 1/β plays the role of the CFG strength s (the optimum is exactly
    CFG's pφ·[p(x|c)/p(x)]^s, normalised, only with a class-wise λ*(c); one scalar λ is an approximation). It
    multiplies a sum over N tokens, so fewer tokens want a larger β.
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
    one = torch.ones_like(gap_neg)
    sign = torch.where(flagged, one, -one)              # flagged rows are positives: -log σ(+β·gap)
    weight = torch.where(flagged, one, lam * one)       # true negatives weigh λ, flagged rows 1
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
    pos, neg, flags, keep = contrastive_labels(labels, reference.config.num_classes, uncond_ratio, collisions,
                                               generator)
    tokens, pos, neg, flags = tokens[keep], pos[keep], neg[keep], flags[keep]
    both_tokens, both_labels = torch.cat([tokens, tokens]), torch.cat([pos, neg])       # (2B, N), (2B,)
    logp = sequence_logprob(policy(both_tokens, both_labels), both_tokens)               # (2B,)
    with torch.no_grad():
        ref = sequence_logprob(reference(both_tokens, both_labels), both_tokens)
    B = len(tokens)
    return LOSSES[loss](logp[:B], logp[B:], ref[:B], ref[B:], beta=beta, lam=lam, neg_as_pos=flags)


# ----------------------------------------------------------------------------------------------------------
# 6. Training stages. Each returns a checkpoint dict; `run_stage` caches it under --out, atomically.

# Several processes (`torchrun --nproc_per_node=N minicca.py ...`): skip these helpers on a first read. With one
# process RANK = 0, WORLD = 1 and each is a no-op. Under torchrun every rank runs the whole program with the same
# seed on its share of each global batch; DDP averages gradients, so all ranks keep identical weights. Sampling
# and evaluation are not split: every rank computes the same seeded samples (so the table matches one process's)
# and rank 0 reports them, which keeps the ranks in step without long waits at a barrier.
RANK, WORLD = 0, 1


def init_distributed(device):
    """Detect torchrun from its environment (as nanoGPT does) and join its process group: NCCL with one GPU per
    rank, Gloo on CPU. Only rank 0 prints, draws progress bars and writes files."""
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
        sys.stdout, tqdm = open(os.devnull, "w"), functools.partial(tqdm, disable=True)
    return device


def shard(batch):
    """This rank's rows of a global batch: RANK, RANK + WORLD, ... (the split of torch's DistributedSampler with
    DataLoader(batch_size=B / WORLD)), kept a pure function of (seed, step) for --resume."""
    return batch[RANK::WORLD]


def ddp(model):
    """The model as a training step calls it: DistributedDataParallel averages gradients across ranks during
    backward. State dicts and the optimizer keep using the bare model."""
    return nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model


def across_ranks(stats, device):
    """Average a dict of floats over ranks: the global batch's loss, the same number one process would log."""
    if WORLD == 1:
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(stats, (t / WORLD).tolist()))


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


@rank0_only
def save_checkpoint(obj, path):
    """Atomic: write a temporary file, then rename, so a kill at any moment leaves the last good file."""
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
        raise UserError(f"{path} is unreadable (truncated or corrupted? {type(ckpt).__name__}): delete it or pass "
                        f"--retrain {stage}")
    return ckpt


def check_config(path, saved, wanted, stage, fix=None):
    diff = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]
    if diff:
        raise UserError(f"{path} was made with other settings ({'; '.join(diff)}): "
                        f"{fix or f'pass --retrain {stage} to redo it, or use another --out'}")


def batch_indices(n, batch_size, step, seed):
    """The rows of batch `step`: a fresh permutation each epoch, a pure function of (seed, step) so that a
    resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_loop(name, partial, config, model, optimizer, num_steps, lr_at, batch_loss, args, device):
    """Run optimizer steps start..num_steps with a progress bar. Saves `partial` (weights, optimizer, step,
    history) every --save-every steps and on Ctrl-C; --resume continues from it. Every step reseeds the RNG
    from (seed, step), so a resumed run ends with the same weights as an uninterrupted one (on CPU).
    batch_loss(step) -> (loss, stats dict). Returns the history of losses and stats."""
    start, history = 0, []
    if os.path.exists(partial):
        if args.resume and name not in args.redo:
            state = load_checkpoint(partial, device, name)
            check_config(partial, state["config"], config, name, "run without --resume to start over")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = state["step"], state["history"]
            print(f"[{name}] resuming from step {start}/{num_steps} ({partial})")
        else:
            print(f"[{name}] note: {partial} holds an interrupted run; pass --resume to continue it. Starting over.")

    def save(step):
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "history": history, "config": config}, partial)

    done, updating = start, False
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=name, dynamic_ncols=True)
    try:
        for step in bar:
            torch.manual_seed(args.seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with autocast(device):
                loss, stats = batch_loss(step)
            logged = across_ranks({"loss": loss.item(), **stats}, device)
            if not math.isfinite(logged["loss"]):
                kept = partial if os.path.exists(partial) else "no partial checkpoint yet"
                raise UserError(f"[{name}] non-finite loss at step {step}; stopped, last good checkpoint kept "
                                f"({kept}). Try a lower learning rate.")
            updating = True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            updating, done = False, step + 1
            history.append({"step": step, **logged})
            bar.set_postfix({k: f"{v:.3g}" for k, v in history[-1].items() if k != "step"}, refresh=False)
            if args.save_every and done % args.save_every == 0 and done < num_steps:
                save(done)
    except KeyboardInterrupt:
        bar.close()
        if not updating and done > start:
            save(done)
        raise Interrupted(f"[{name}] interrupted; progress up to the last save is in {partial}: rerun the same "
                        f"command with --resume to continue")
    bar.close()
    return history


def adamw(model, lr, weight_decay):
    """AdamW with decay on matrices only (nanoGPT), betas (0.9, 0.95) as in LlamaGen and the CCA paper."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest,
                              "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def cosine_lr(base, steps, warmup_frac=0.05, floor=0.1):
    warmup = max(int(steps * warmup_frac), 1)
    return lambda s: base * min((s + 1) / warmup, floor + (1 - floor) * 0.5 * (1 + math.cos(
        math.pi * min(max(s - warmup, 0) / max(steps - warmup, 1), 1.0))))


def train_tokenizer(data, P, args, device, partial, config):
    X = to_float(data["x_train"])                                                  # (N, C, H, W), on CPU
    model = VQTokenizer(VQConfig(X.size(1), P["vq_hidden"], P["codebook_size"], P["code_dim"])).to(device)
    opt, net = torch.optim.Adam(model.parameters(), lr=P["vq_lr"]), ddp(model)

    def batch_loss(step):
        x = X[batch_indices(len(X), P["vq_batch"], step, args.seed)]             # the global batch, on CPU
        if step % 100 == 0:  # step 0: data-driven codebook init; later: restart the codes this batch left unused
            with torch.no_grad():  # (on the global batch, so that every rank makes the same restart)
                z_e = model.encoder(x.to(device))
                unused = torch.bincount(model.quantize(z_e).flatten(), minlength=P["codebook_size"]) == 0
                model.restart_codes(z_e, torch.ones_like(unused) if step == 0 else unused)
        x = shard(x).to(device)                                                       # this rank's rows
        recon, vq_loss, indices, _ = net(x)
        mse = F.mse_loss(recon.float(), x)
        return mse + vq_loss, {"mse": mse.item(), "usage": codebook_stats(indices, P["codebook_size"])[0]}

    history = train_loop("tokenizer", partial, config, model, opt, P["vq_steps"], lambda s: P["vq_lr"],
                         batch_loss, args, device)
    return {"model": model.state_dict(), "vq_config": asdict(model.config), "history": history}


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
    return {"mse": mse, "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "usage": usage, "perplexity": perplexity}


@torch.no_grad()
def encode_all(tokenizer, x_uint8, device, batch=1000):
    """uint8 images (N, H, W, C) -> int16 token grids (N, h*w), raster order; computed once per tokenizer."""
    out = [tokenizer.encode(to_float(x_uint8[i:i + batch]).to(device)).flatten(1).short().cpu()
           for i in range(0, len(x_uint8), batch)]
    return torch.cat(out)


def train_gpt(tokens, labels, num_classes, P, args, device, partial, config):
    gpt_config = GPTConfig(P["codebook_size"], num_classes, tokens.size(1), P["n_layer"], P["n_head"],
                           P["n_embd"], P["dropout"])
    model = GPT(gpt_config).to(device)
    opt, net = adamw(model, P["lr"], 0.05), ddp(model)
    B = min(P["batch_size"], len(tokens))

    def batch_loss(step):
        idx = batch_indices(len(tokens), B, step, args.seed)
        x, y = tokens[idx].long().to(device), labels[idx].to(device)               # (B, N), (B,)
        y = torch.where(torch.rand(len(y), device=device) < P["cond_dropout"], num_classes, y)  # null class
        x, y = shard(x), shard(y)                                                    # this rank's rows
        logits = net(x, y)                                                           # (B, N, V)
        return F.cross_entropy(logits.float().flatten(0, 1), x.flatten()), {}

    history = train_loop("pretrain", partial, config, model, opt, P["steps"], cosine_lr(P["lr"], P["steps"]),
                         batch_loss, args, device)
    return {"model": model.state_dict(), "gpt_config": asdict(gpt_config), "history": history}


@torch.no_grad()
def bits_per_token(model, tokens, labels, device, batch=500):
    """Mean negative log-likelihood per token, in bits, with the true classes (no dropout)."""
    model.eval()
    total = 0.0
    for i in range(0, len(tokens), batch):
        x, y = tokens[i:i + batch].long().to(device), labels[i:i + batch].to(device)
        total -= sequence_logprob(model(x, y), x).sum().item()
    return total / tokens.numel() / math.log(2)


def finetune_cca(base, tokens, labels, P, args, device, partial, config):
    """CCA (or a baseline): the policy starts from the pretrained weights, the reference is a frozen copy;
    dropout is off in both (eval mode) so that every gap is exactly 0 at step 0."""
    policy, reference = copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    reference.requires_grad_(False)
    opt, net = adamw(policy, P["cca_lr"], 0.05), ddp(policy)  # the frozen reference is never wrapped
    B = min(P["batch_size"], len(tokens))
    steps = max(math.ceil(P["cca_epochs"] * len(tokens) / B), 1)

    def batch_loss(step):  # under torchrun the negatives are formed within each rank's rows, as officially
        idx = shard(batch_indices(len(tokens), B, step, args.seed + 1))
        x, y = tokens[idx].long().to(device), labels[idx].to(device)
        return cca_step_loss(net, reference, x, y, P["loss"], P["beta"], P["lam"], P["uncond_ratio"],
                             P["collisions"])

    history = train_loop("cca", partial, config, policy, opt, steps, lambda s: P["cca_lr"], batch_loss, args,
                         device)
    return {"model": policy.state_dict(), "gpt_config": asdict(policy.config), "history": history}


# ----------------------------------------------------------------------------------------------------------
# 7. Evaluation: a small classifier is the judge (Inception is neither downloadable here nor suited to 28x28)

class Classifier(nn.Module):
    """A small CNN; its 128-d penultimate features play Inception's role for FID and precision/recall."""

    def __init__(self, channels, num_classes, width=32):
        super().__init__()
        w = width

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        self.features = nn.Sequential(*conv(channels, w), *conv(w, w), nn.MaxPool2d(2), *conv(w, 2 * w),
                                      *conv(2 * w, 2 * w), nn.MaxPool2d(2), *conv(2 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(data, P, args, device, partial, config):
    X, Y = to_float(data["x_train"]), torch.from_numpy(data["y_train"])
    model = Classifier(X.size(1), len(data["classes"]), P["clf_width"]).to(device)
    opt, net = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4), ddp(model)
    B = min(128, len(X))
    steps = max(math.ceil(P["clf_epochs"] * len(X) / B), 1)

    def batch_loss(step):
        idx = batch_indices(len(X), B, step, args.seed + 2)
        x, y = X[idx].to(device), Y[idx].to(device)
        if x.size(1) == 3:  # RGB: random crops (pad 4) and flips; digits must not be flipped
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            dx, dy = torch.randint(-4, 5, (2,)).tolist()
            x = F.pad(x, (4, 4, 4, 4), mode="reflect")[:, :, 4 + dy:4 + dy + X.size(2), 4 + dx:4 + dx + X.size(3)]
        loss = F.cross_entropy(net(shard(x)).float(), shard(y))  # BatchNorm: per-rank batch statistics
        return loss, {}

    model.train()
    history = train_loop("classifier", partial, config, model, opt, steps, cosine_lr(2e-3, steps), batch_loss,
                         args, device)
    model.eval()
    return {"model": model.state_dict(), "history": history,
            "test_accuracy": classify(model, data["x_test"], device)[1].argmax(1).eq(
                torch.from_numpy(data["y_test"])).float().mean().item()}


@torch.no_grad()
def classify(classifier, images, device, batch=500):
    """uint8 NHWC numpy or float (B, C, H, W) tensor -> (features (B, 128), probabilities (B, K)), on CPU."""
    classifier.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        x = (to_float(x) if isinstance(x, np.ndarray) else x).to(device)
        f = classifier.features(x)
        feats.append(f.float().cpu())
        probs.append(F.softmax(classifier.head(f).float(), -1).cpu())
    return torch.cat(feats), torch.cat(probs)


def fid_from_features(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): |mu_a - mu_b|^2 +
    tr(Sa + Sb - 2 (Sa Sb)^1/2), with tr (Sa Sb)^1/2 = sum sqrt(eig(Sa^1/2 Sb Sa^1/2)) (symmetric, stable)."""
    a, b = a.double(), b.double()
    D = a.size(1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(D, D), torch.cov(b.T).reshape(D, D)  # reshape: D = 1 gives a scalar
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def inception_score(probs):
    """exp E_x KL(p(y|x) || p(y)): K for confident, balanced predictions; 1 when every sample gets one class."""
    p = probs.double().clamp(min=1e-12)
    return math.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().item())


def precision_recall(real, fake, k=3):
    """k-NN precision and recall (Kynkäänniemi et al., 2019): a sample is 'covered' when it lies within the
    distance from some point of the other set to that point's k-th nearest neighbour in its own set."""
    def radii(x):
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values                   # +1: skip the point itself
    k = min(k, len(real) - 1, len(fake) - 1)  # tiny sets: the k-th neighbour must exist
    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)                                                   # (Nf, Nr)
    precision = (d <= r_real[None]).any(1).float().mean().item()
    recall = (d.T <= r_fake[None]).any(1).float().mean().item()
    return precision, recall


def evaluate(images, labels, classifier, real_features, device, k=3):
    """Score generated images (float (B, C, H, W) in [0, 1], or uint8 NHWC) made for `labels` (B,): conditional
    accuracy, FID against `real_features` (the test set), classifier IS, and k-NN precision/recall against an
    equally large random subset of the real features."""
    feats, probs = classify(classifier, images, device)
    labels = torch.as_tensor(labels).cpu()
    subset = real_features[torch.randperm(len(real_features), generator=torch.Generator().manual_seed(0))
                           [:len(feats)]]
    precision, recall = precision_recall(subset, feats, k)
    return {"accuracy": probs.argmax(1).eq(labels).float().mean().item(),
            "fid": fid_from_features(feats, real_features), "is": inception_score(probs),
            "precision": precision, "recall": recall}


def balanced_labels(n, num_classes, device="cpu"):
    return torch.arange(n, device=device) % num_classes


def sample_images(model, tokenizer, labels, cfg_scale, grid, P, device, seed, batch=500):
    """Images (B, C, H, W) for `labels`, with token grids of shape `grid` (h, w), generated in batches of
    `batch` with one seeded generator; returns (images, seconds per image)."""
    gen = torch.Generator(device).manual_seed(seed)
    images, t0 = [], time.perf_counter()
    for i in range(0, len(labels), batch):
        with autocast(device):
            tokens = generate(model, labels[i:i + batch], cfg_scale, P["temperature"], P["top_k"], P["top_p"],
                              generator=gen)
        images.append(tokenizer.decode(tokens.view(len(tokens), *grid)).float())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(images), (time.perf_counter() - t0) / len(labels)


# ----------------------------------------------------------------------------------------------------------
# 8. The pipeline and the command line

PRESETS = {  # steps are optimizer steps; epochs are passes over the training set
    "micro": dict(vq_hidden=16, codebook_size=32, code_dim=8, vq_steps=40, vq_batch=64, vq_lr=2e-3,
                  n_layer=1, n_head=2, n_embd=32, dropout=0.0, steps=40, batch_size=32, lr=3e-3,
                  cca_epochs=0.05, cca_lr=1e-3, clf_width=8, clf_epochs=0.3, eval_samples=100,
                  samples_per_class=4, sweep_cfg=[1.0, 2.0], sweep_lam=[1.0, 10.0]),
    "cpu": dict(vq_hidden=64, codebook_size=256, code_dim=32, vq_steps=800, vq_batch=128, vq_lr=2e-3,
                n_layer=4, n_head=4, n_embd=128, dropout=0.0, steps=800, batch_size=64, lr=2e-3,
                cca_lr=2e-4, clf_width=32, clf_epochs=2.0, eval_samples=1000),
    "gpu": dict(vq_hidden=128, codebook_size=512, code_dim=32, vq_steps=8000, vq_batch=256, vq_lr=1e-3,
                n_layer=8, n_head=8, n_embd=384, dropout=0.1, steps=20000, batch_size=256, lr=6e-4,
                cca_lr=6e-5, clf_width=64, clf_epochs=30.0, eval_samples=5000),
}
COMMON = dict(cond_dropout=0.1, cfg=2.0, temperature=1.0, top_k=None, top_p=None, loss="cca", beta=0.1,
              lam=10.0, uncond_ratio=0.1, collisions="positive", cca_epochs=1.0, samples_per_class=10,
              sweep_cfg=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0], sweep_lam=[1.0, 3.0, 10.0, 30.0, 100.0])
REDO = {"tokenizer": ["tokenizer", "tokens", "pretrain", "cca"], "tokens": ["tokens", "pretrain", "cca"],
        "pretrain": ["pretrain", "cca"],
        "cca": ["cca"], "classifier": ["classifier"], "all": ["tokenizer", "tokens", "pretrain", "cca", "classifier"]}


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here (use --device auto or cpu)")
    return torch.device(name)


def settings(args, device):
    """The preset (cpu on a CPU, gpu otherwise, unless --preset) overridden by every flag given."""
    P = {**COMMON, **PRESETS[args.preset or ("cpu" if device.type == "cpu" else "gpu")]}
    P.update({k: v for k, v in vars(args).items() if k in P and v is not None})
    checks = [("beta", P["beta"] > 0, "> 0"), ("lam", P["lam"] >= 0, ">= 0"),
              ("uncond-ratio", 0 <= P["uncond_ratio"] < 1, "in [0, 1)"), ("cfg", P["cfg"] >= 0, ">= 0"),
              ("temperature", P["temperature"] >= 0, ">= 0"),
              ("top-p", P["top_p"] is None or 0 < P["top_p"] <= 1, "in (0, 1]"),
              ("top-k", P["top_k"] is None or P["top_k"] >= 1, ">= 1"),
              ("cond-dropout", 0 <= P["cond_dropout"] < 1, "in [0, 1)")]
    checks += [(k.replace("_", "-"), P[k] > 0, "> 0") for k in ("batch_size", "steps", "vq_steps", "cca_epochs",
               "clf_epochs", "eval_samples", "samples_per_class", "lr", "cca_lr", "n_layer", "n_embd")]
    checks += [("n-head", P["n_head"] > 0, "> 0"), ("n-embd", P["n_embd"] % max(P["n_head"], 1) == 0,
               "a multiple of --n-head"), ("dropout", 0 <= P["dropout"] < 1, "in [0, 1)"),
               ("codebook-size", P["codebook_size"] >= 2, ">= 2"), ("seed", args.seed >= 0, ">= 0"),
               ("save-every", args.save_every >= 0, ">= 0 (0: never)"),
               ("batch-size", P["batch_size"] % WORLD == 0, f"a multiple of the {WORLD} processes")]
    for flag, ok, what in checks:
        if not ok:
            key = flag.replace("-", "_")
            raise UserError(f"--{flag} must be {what}, got {P[key] if key in P else getattr(args, key)}")
    return P


def fingerprint(data):
    import hashlib
    h = hashlib.md5()
    for k in ("x_train", "y_train", "x_test", "y_test"):
        h.update(np.ascontiguousarray(data[k]).tobytes())
    return f"{len(data['x_train'])}+{len(data['x_test'])}x{'x'.join(map(str, data['x_train'].shape[1:]))}" \
           f":{h.hexdigest()[:10]}"


def run_stage(name, path, config, build, args, device):
    """Load the checkpoint at `path` if it was made with `config`, else build it: build(partial, config) -> dict,
    where `partial` is the path of its resumable save."""
    if os.path.exists(path) and name not in args.redo:
        ckpt = load_checkpoint(path, device, name)
        check_config(path, ckpt.get("config", {}), config, name)
        print(f"[{name}] up to date: {path}")
        return ckpt
    torch.manual_seed(args.seed)
    ckpt = build(path + ".partial", config)
    ckpt.update(config=config, id=os.urandom(4).hex())  # downstream stages record this id
    save_checkpoint(ckpt, path)
    if RANK == 0 and os.path.exists(path + ".partial"):
        os.remove(path + ".partial")
    ckpt["id"] = from_rank0(ckpt["id"])  # under torchrun: one id, and no rank goes on before the file exists
    print(f"[{name}] saved {path}")
    return ckpt


def load_gpt(ckpt, device):
    model = GPT(GPTConfig(**ckpt["gpt_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


@rank0_only
def save_grid(images, nrow, path):
    import torchvision.utils
    torchvision.utils.save_image(images.float().cpu(), path, nrow=nrow, padding=1, pad_value=0.5)


@rank0_only
def save_panels(panels, nrow, path, title=""):
    """Several image grids side by side, each titled: {title: images (B, C, H, W)}."""
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's backend alone
    import torchvision.utils
    fig = Figure(figsize=(3.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], panels.items()):
        grid = torchvision.utils.make_grid(imgs.float().cpu(), nrow=nrow, padding=1, pad_value=0.5)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cca_name(P):
    """The fine-tune's file name: loss, β, λ, epochs, and the row settings when they are not the defaults."""
    extra = ("" if P["collisions"] == "positive" else f"_{P['collisions']}") + \
            ("" if P["uncond_ratio"] == 0.1 else f"_u{P['uncond_ratio']:g}")
    return f"cca_{P['loss']}_b{P['beta']:g}_l{P['lam']:g}_e{P['cca_epochs']:g}{extra}"


@rank0_only
def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def print_table(rows):
    """The evaluation table, as Markdown (so README tables are this output, pasted)."""
    cols = ["accuracy", "fid", "is", "precision", "recall", "sec_per_image"]
    print("| setting | " + " | ".join(cols) + " |\n|---" * 1 + "|---:" * len(cols) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join("-" if r.get(c) is None else f"{r[c]:.2e}" if c == "sec_per_image"
                                         else f"{r[c]:.3f}" if c != "fid" else f"{r[c]:.3g}" for c in cols) + " |")


def run(args):
    device = init_distributed(pick_device(args.device))
    if args.pretrained and args.dataset not in (None, "tiny"):
        raise UserError("--pretrained uses the checkpoints shipped in tiny_data/, made on the default dataset: "
                        "drop --dataset")
    if args.pretrained and not os.path.isdir(PRETRAINED):
        raise UserError(f"no reference checkpoints in {PRETRAINED}: see tiny_data/README.md to make them")
    if args.pretrained and args.preset is None:
        args.preset = "cpu"  # the reference checkpoints were made with the cpu preset
    P = settings(args, device)
    if RANK > 0:
        from_rank0()  # under torchrun rank 0 loads first (and downloads, if it must); the others wait, then read
    data = load_dataset(args.dataset, args.data_root)
    if RANK == 0:
        from_rank0()
    name = "tiny" if args.dataset in (None, "tiny") else os.path.splitext(os.path.basename(args.dataset))[0]
    out = args.out or os.path.join("runs", name)
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f".write_test{RANK}"), "w"):
            pass
        os.remove(os.path.join(out, f".write_test{RANK}"))
    except OSError as e:
        raise UserError(f"--out {out} is not a writable folder ({e.strerror})")
    if args.pretrained and RANK == 0:
        import shutil
        for f in sorted(os.listdir(PRETRAINED)):
            if not os.path.exists(os.path.join(out, f)):
                shutil.copy(os.path.join(PRETRAINED, f), os.path.join(out, f))
    from_rank0()  # the others wait for the copies
    K, (H, W, C) = len(data["classes"]), data["x_train"].shape[1:]
    grid = (H // 4, W // 4)
    print(f"minicca: {name}: {len(data['x_train'])} train / {len(data['x_test'])} test images {H}x{W}x{C}, "
          f"{K} classes; device {device}; preset {args.preset or ('cpu' if device.type == 'cpu' else 'gpu')}; "
          f"out {out}" + (f"; {WORLD} processes (DDP), global batch {P['batch_size']}" if WORLD > 1 else ""))
    if device.type == "cpu" and P["n_embd"] >= 384:
        warn_estimate(P, grid, K, device)
    data_id = fingerprint(data)
    path = lambda f: os.path.join(out, f)  # noqa: E731

    # 1. tokenizer
    vq_keys = ["vq_hidden", "codebook_size", "code_dim", "vq_steps", "vq_batch", "vq_lr"]
    tk = run_stage("tokenizer", path("tokenizer.pt"), {"data": data_id, "seed": args.seed, **{k: P[k] for k in
                   vq_keys}}, lambda *a: train_tokenizer(data, P, args, device, *a), args, device)
    tokenizer = VQTokenizer(VQConfig(**tk["vq_config"])).to(device).eval()
    tokenizer.load_state_dict(tk["model"])
    rep = tokenizer_report(tokenizer, data["x_test"], device)
    print(f"[tokenizer] test MSE {rep['mse']:.4f}, PSNR {rep['psnr']:.1f} dB, codebook usage {rep['usage']:.0%}, "
          f"perplexity {rep['perplexity']:.0f} of {P['codebook_size']}")
    x = to_float(data["x_test"][:16]).to(device)
    save_grid(torch.cat([x, tokenizer.decode(tokenizer.encode(x))]), 16, path("tokenizer_recon.png"))

    # 2. token cache: the GPT never touches pixels again
    tok = run_stage("tokens", path("tokens.pt"), {"tokenizer": tk["id"]}, lambda *_: {
        "train": encode_all(tokenizer, data["x_train"], device),
        "test": encode_all(tokenizer, data["x_test"], device)}, args, device)
    y_train, y_test = torch.from_numpy(data["y_train"]), torch.from_numpy(data["y_test"])

    # 3. pretraining with condition dropout
    gpt_keys = ["n_layer", "n_head", "n_embd", "dropout", "steps", "batch_size", "lr", "cond_dropout"]
    gk = run_stage("pretrain", path("gpt.pt"), {"tokenizer": tk["id"], "seed": args.seed, **{k: P[k] for k in
                   gpt_keys}}, lambda *a: train_gpt(tok["train"], y_train, K, P, args, device, *a), args, device)
    base = load_gpt(gk, device)
    print(f"[pretrain] {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters; bits/token: "
          f"train {bits_per_token(base, tok['train'][:len(tok['test'])], y_train[:len(tok['test'])], device):.3f}, "
          f"val {bits_per_token(base, tok['test'], y_test, device):.3f}")

    # 4. samples, guidance-free and with CFG
    n = P["samples_per_class"]
    labels = torch.arange(K, device=device).repeat_interleave(n)
    panels = {"base, no guidance": sample_images(base, tokenizer, labels, 1.0, grid, P, device, args.seed)[0],
              f"base, CFG {P['cfg']:g}": sample_images(base, tokenizer, labels, P["cfg"], grid, P, device,
                                                       args.seed)[0]}
    for (title, images), file in zip(panels.items(), ["samples_base.png", f"samples_base_cfg{P['cfg']:g}.png"]):
        save_grid(images, n, path(file))
        print(f"[samples] {title}: {path(file)} (a row per class)")

    # 5. CCA fine-tuning
    models = {"base": base}
    if args.cca:
        cca_ckpt = stage_cca(P, gk, tok, y_train, args, device, path)
        tuned = models[P["loss"]] = load_gpt(cca_ckpt, device)  # "cca", or the baseline's name
        for w in (1.0, P["cfg"]):
            panels[f"{P['loss']}, " + ("no guidance" if w == 1 else f"CFG {w:g}")] = sample_images(
                tuned, tokenizer, labels, w, grid, P, device, args.seed)[0]
        save_panels(panels, n, path(f"compare_{cca_name(P)}.png"), f"β={P['beta']:g}, λ={P['lam']:g}, rows: classes")
        print(f"[cca] comparison: {path(f'compare_{cca_name(P)}.png')}")

    # 6. evaluation
    if args.eval or args.sweep:
        clf_cfg = {"data": data_id, "seed": args.seed, "clf_width": P["clf_width"], "clf_epochs": P["clf_epochs"]}
        ck = run_stage("classifier", path("classifier.pt"), clf_cfg,
                       lambda *a: train_classifier(data, P, args, device, *a), args, device)
        clf = Classifier(C, K, P["clf_width"]).to(device)
        clf.load_state_dict(ck["model"])
        clf.eval()
        print(f"[classifier] test accuracy {ck['test_accuracy']:.2%}")
        judge = Judge(clf, data, tokenizer, grid, P, device, args.seed)
    if args.eval:
        rows = {"real (train images)": judge.real_floor()}
        for mname, model in models.items():
            rows[f"{mname}, no guidance"] = judge(model, 1.0)
            rows[f"{mname}, CFG {P['cfg']:g}"] = judge(model, P["cfg"])
        print(f"\n[eval] {P['eval_samples']} samples per row, balanced over classes, seed {args.seed}; FID/IS/"
              f"precision/recall in the classifier's features, against the {len(data['x_test'])} test images")
        print_table(rows)
        write_json({"rows": rows, "settings": P, "seed": args.seed, "device": str(device), "processes": WORLD,
                    "classifier_accuracy": ck["test_accuracy"], "tokenizer": rep}, path("metrics.json"))
        print(f"[eval] wrote {path('metrics.json')}")
    if args.sweep:
        run_sweep(judge, base, P, gk, tok, y_train, args, device, path)


def export_pretrained(run_dir, dest=PRETRAINED):
    """Copy the default run's checkpoints (python minicca.py --out run_dir) into tiny_data/pretrained, with
    float weights stored as float16 to halve their size; --pretrained starts from them."""
    os.makedirs(dest, exist_ok=True)
    for f in ["tokenizer.pt", "gpt.pt", cca_name({**COMMON, **PRESETS["cpu"]}) + ".pt", "classifier.pt"]:
        ckpt = load_checkpoint(os.path.join(run_dir, f))
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        save_checkpoint(ckpt, os.path.join(dest, f))
        print(f"{os.path.join(dest, f)}: {os.path.getsize(os.path.join(dest, f)) / 2**20:.2f} MiB")


def stage_cca(P, gk, tok, y_train, args, device, path):
    cca_keys = ["loss", "beta", "lam", "cca_epochs", "cca_lr", "uncond_ratio", "collisions"]
    cfg = {"base": gk["id"], "seed": args.seed, **{k: P[k] for k in cca_keys}}
    base = load_gpt(gk, device)
    return run_stage("cca", path(cca_name(P) + ".pt"), cfg,
                     lambda *a: finetune_cca(base, tok["train"], y_train, P, args, device, *a), args, device)


class Judge:
    """Generates `eval_samples` balanced, seeded samples for a model and scores them with `evaluate`."""

    def __init__(self, classifier, data, tokenizer, grid, P, device, seed):
        self.clf, self.data, self.tok, self.grid, self.P, self.device, self.seed = \
            classifier, data, tokenizer, grid, P, device, seed
        self.real = classify(classifier, data["x_test"], device)[0]
        self.labels = balanced_labels(P["eval_samples"], len(data["classes"]), device)

    def __call__(self, model, cfg_scale):
        images, sec = sample_images(model, self.tok, self.labels, cfg_scale, self.grid, self.P, self.device,
                                    self.seed)
        return {**evaluate(images, self.labels, self.clf, self.real, self.device), "sec_per_image": sec}

    def real_floor(self):
        """Real training images, scored like samples: the best any generator can hope for at this count."""
        n, y = self.P["eval_samples"], self.data["y_train"]
        g = np.random.default_rng(self.seed)
        per = [g.permutation(np.flatnonzero(y == c))[:math.ceil(n / len(self.data["classes"]))]
               for c in range(len(self.data["classes"]))]
        idx = np.array([p[i] for i in range(max(map(len, per))) for p in per if i < len(p)], dtype=np.int64)[:n]
        return {**evaluate(self.data["x_train"][idx], y[idx], self.clf, self.real, self.device),
                "sec_per_image": None}


def run_sweep(judge, base, P, gk, tok, y_train, args, device, path):
    """The paper's Fig. 4 at our scale: CFG scale on the base model versus λ over CCA fine-tunes."""
    res = {"cfg": [], "lam": [], "settings": P, "seed": args.seed}
    for w in P["sweep_cfg"]:
        res["cfg"].append({"cfg": w, **judge(base, w)})
        print(f"[sweep] base CFG {w:g}: " + ", ".join(f"{k} {v:.3g}" for k, v in res["cfg"][-1].items()))
    for lam in P["sweep_lam"]:
        Q = {**P, "lam": lam}
        res["lam"].append({"lam": lam, **judge(load_gpt(stage_cca(Q, gk, tok, y_train, args, device, path),
                                                          device), 1.0)})
        print(f"[sweep] CCA λ {lam:g}: " + ", ".join(f"{k} {v:.3g}" for k, v in res["lam"][-1].items()))
    write_json(res, path("sweep.json"))
    print_table({**{f"base, CFG {p['cfg']:g}": p for p in res["cfg"]},
                 **{f"CCA λ={p['lam']:g}, no guidance": p for p in res["lam"]}})
    plot_sweep(res, path("sweep.png"))
    print(f"[sweep] wrote {path('sweep.json')} and {path('sweep.png')}")
    return res


@rank0_only
def plot_sweep(res, file):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, (x, y) in zip(axes, [("accuracy", "fid"), ("recall", "precision")]):
        for key, label, style in [("cfg", "base + CFG (scale w)", "o-"), ("lam", "CCA, no guidance (λ)", "s-")]:
            pts = res[key]
            ax.plot([p[x] for p in pts], [p[y] for p in pts], style, label=label)
            for p in pts:
                ax.annotate(f"{p[key]:g}", (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def warn_estimate(P, grid, K, device):
    """Time two pretraining steps of this size on this device and extrapolate, before committing to hours."""
    model = GPT(GPTConfig(P["codebook_size"], K, grid[0] * grid[1], P["n_layer"], P["n_head"], P["n_embd"]))
    opt, x = adamw(model, 1e-4, 0.0), torch.randint(0, P["codebook_size"], (P["batch_size"], grid[0] * grid[1]))
    t0 = time.perf_counter()
    for _ in range(2):
        F.cross_entropy(model(x, x[:, 0] % K).flatten(0, 1), x.flatten()).backward()
        opt.step()
    sec = (time.perf_counter() - t0) / 2
    print(f"warning: a GPU-sized run on {device}: pretraining alone would take about "
          f"{sec * P['steps'] / 3600:.1f} h here ({sec:.2f} s/step x {P['steps']} steps). --preset cpu is sized "
          f"for a CPU.", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# 9. Benchmarks: the speed claims, measured side by side in one run (ratios, not timed tests)

def timed(fn, device, repeat=3):
    """Mean seconds per call after one warm-up call; CUDA events and a synchronise on a GPU."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def peak_memory(fn, device):
    """Peak bytes fn() adds: CUDA allocator statistics on a GPU; on Linux CPUs the growth of peak resident memory
    (VmHWM, reset through /proc/self/clear_refs); None where neither exists."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak to the current resident size
        base = status("VmRSS:")
        fn()
        return status("VmHWM:") - base
    except (OSError, StopIteration):
        return None


def bench(args):
    """Guidance-free vs CFG sampling, KV cache vs recompute, pretraining vs CCA steps, for the preset's model
    (random weights: speed does not depend on them)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("bench measures one process: run it with python, not torchrun")
    device = pick_device(args.device)
    P = settings(args, device)
    if device.type == "cpu":
        with contextlib.suppress(OSError, AttributeError):  # glibc: large blocks by mmap, so freed tensors leave
            import ctypes                                    # resident memory and the peak per phase is visible
            ctypes.CDLL("libc.so.6").mallopt(-3, 65536)      # M_MMAP_THRESHOLD = 64 KiB
    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset, args.data_root)
    (H, W, _), K, V = data["x_train"].shape[1:], len(data["classes"]), P["codebook_size"]
    N, n_train = (H // 4) * (W // 4), len(data["x_train"])
    model = GPT(GPTConfig(V, K, N, P["n_layer"], P["n_head"], P["n_embd"])).to(device).eval()
    batches = [4, 16, 64] if P["n_embd"] < 64 else [16, 64, 256] if device.type == "cpu" else [64, 256, 1024]
    w = P["cfg"] if P["cfg"] != 1.0 else 1.5
    print(f"bench: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter GPT, N={N} tokens, "
          f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPUs'}"
          f"), torch {torch.__version__}, CFG w={w:g}")

    def sampler(B, scale, cache=True):
        labels = torch.arange(B, device=device) % K
        return lambda: generate(model, labels, scale, use_cache=cache, generator=torch.Generator(device).manual_seed(0))
    gf, cfg, gf2 = {}, {}, {}
    for B in batches:
        with autocast(device):
            cfg[B] = B / timed(sampler(B, w), device)
            gf[B] = B / timed(sampler(B, 1.0), device)
            gf2[B] = 2 * B / timed(sampler(2 * B, 1.0), device)
        print(f"  batch {B:>5}: guidance-free {gf[B]:8.1f} img/s, CFG {cfg[B]:8.1f} img/s; same batch "
              f"{gf[B] / cfg[B]:.2f}x; equal rows per forward (guidance-free at {2 * B}) {gf2[B] / cfg[B]:.2f}x")
    best_gf, best_cfg = max({**gf, **gf2}.values()), max(cfg.values())
    r = {"equal_rows": gf2[batches[-1]] / cfg[batches[-1]], "best_batch": best_gf / best_cfg,
         "same_batch": gf[batches[-1]] / cfg[batches[-1]]}
    B = batches[1]
    with autocast(device):
        r["kv_cache"] = timed(sampler(B, 1.0, False), device, 1) / timed(sampler(B, 1.0), device, 1)

    tokens, labels = torch.randint(0, V, (P["batch_size"], N), device=device), torch.arange(P["batch_size"],
                                                                                             device=device) % K
    policy, reference = copy.deepcopy(model).train(), copy.deepcopy(model).eval().requires_grad_(False)
    opt = adamw(policy, 1e-5, 0.0)

    def train_step(cca):
        with autocast(device):
            loss = cca_step_loss(policy, reference, tokens, labels)[0] if cca else \
                F.cross_entropy(policy(tokens, labels).float().flatten(0, 1), tokens.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_pre, t_cca = timed(lambda: train_step(False), device), timed(lambda: train_step(True), device)
    mem = {k: peak_memory(f, device) for k, f in [("pretrain step", lambda: train_step(False)),
                                                   ("CCA step", lambda: train_step(True)),
                                                   ("CFG sampling", sampler(B, w)),
                                                   ("guidance-free sampling", sampler(B, 1.0))]}
    print(f"  training at batch {P['batch_size']}: pretraining {P['batch_size'] * N / t_pre:,.0f} tokens/s, CCA "
          f"{P['batch_size'] * N / t_cca:,.0f} tokens/s (the theory says about 2.7x slower)")
    print("ratios:")
    print(f"  guidance-free / CFG sampling, equal rows ({2 * batches[-1]}):       {r['equal_rows']:.2f}x  "
          f"(target >= 1.85x, limit 2x)")
    print(f"  guidance-free / CFG sampling, each at its best batch:  {r['best_batch']:.2f}x")
    print(f"  guidance-free / CFG sampling, same batch {batches[-1]}:          {r['same_batch']:.2f}x")
    print(f"  KV cache / full recompute, batch {B}:                 {r['kv_cache']:.2f}x  (target >= 3x)")
    print(f"  CCA step / pretraining step time:                     {t_cca / t_pre:.2f}x  (theory ~2.7x)")
    print(f"  one CCA epoch ({n_train} images) / pretraining ({P['steps']} steps): "
          f"{100 * math.ceil(n_train / P['batch_size']) * t_cca / (P['steps'] * t_pre):.1f}%")
    print("peak memory:" + "".join(f"\n  {k}: {v / 2**20:.1f} MiB" if v is not None else f"\n  {k}: n/a here"
                                   for k, v in mem.items()) + "  (CPU: growth of peak resident memory)" * (device.type == "cpu"))
    return r


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" would hide that the preset decides
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="minicca.py", formatter_class=_Help,
        description="Train a VQ tokenizer and a class-conditional GPT, sample with and without CFG, fine-tune "
                    "with CCA, and compare. Every stage is cached under --out and skipped when up to date. "
                    "Flags left unset take their value from --preset.",
        epilog="Several GPUs: torchrun --standalone --nproc_per_node=N minicca.py [flags] trains every stage with "
               "DDP (NCCL; Gloo on CPU); --batch-size is then the global batch.")
    p.add_argument("command", nargs="?", default="run", choices=["run", "bench"],
                   help="run: the pipeline; bench: sampling and training speed ratios")
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default=None, help="mnist | cifar10 | path/to/data.npz (default: the MNIST "
                   "subset in tiny_data/, offline)")
    g.add_argument("--data-root", default="data", help="where torchvision's MNIST/CIFAR10 files are or go")
    g.add_argument("--out", default=None, help="output folder (default runs/<dataset>)")
    g.add_argument("--preset", choices=list(PRESETS), default=None, help="micro (tests), cpu (a laptop), "
                   "gpu (one GPU); default: cpu on a CPU, gpu otherwise")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--retrain", action="append", default=[], choices=list(REDO),
                   help="redo this stage and those after it even if its checkpoint is up to date")
    g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its .partial save")
    g.add_argument("--save-every", type=int, default=200, help="save a resumable checkpoint every N steps")
    g.add_argument("--pretrained", action="store_true", help="start from the reference checkpoints in "
                   "tiny_data/pretrained (default dataset only): straight to sampling and evaluation")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--vq-steps", type=int, help="tokenizer optimizer steps (preset)")
    g.add_argument("--codebook-size", type=int, help="codes in the codebook = the GPT's vocabulary (preset)")
    g = p.add_argument_group("pretraining")
    for flag, t, what in [("--n-layer", int, "transformer blocks"), ("--n-head", int, "attention heads"),
                          ("--n-embd", int, "width"), ("--dropout", float, "dropout in the GPT"),
                          ("--steps", int, "pretraining optimizer steps"), ("--batch-size", int, "GPT and CCA "
                          "batch size"), ("--lr", float, "pretraining peak learning rate (cosine schedule)"),
                          ("--cond-dropout", float, "probability of the null class in pretraining (0.1)")]:
        g.add_argument(flag, type=t, help=what + " (preset)" * ("(0.1)" not in what))
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg", type=float, help=f"CFG scale w (LlamaGen convention: 1 = no guidance); default "
                   f"{COMMON['cfg']}, the best FID of the sweep on the default data (see README)")
    g.add_argument("--temperature", type=float, help="sampling temperature (1; 0 = greedy)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with this mass (off)")
    g.add_argument("--samples-per-class", type=int, help="columns of the sample grids (10)")
    g = p.add_argument_group("CCA fine-tuning")
    g.add_argument("--cca", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune the pretrained model with CCA (or --loss) after pretraining")
    g.add_argument("--loss", choices=list(LOSSES), help=f"default {COMMON['loss']}; dpo and unlearning are the "
                   "paper's baselines")
    g.add_argument("--beta", type=float, help=f"default {COMMON['beta']} (β·N ≈ 5 for 49 tokens; see README)")
    g.add_argument("--lam", type=float, help=f"default {COMMON['lam']} (the diversity-fidelity knob)")
    g.add_argument("--cca-epochs", type=float, help="passes over the training tokens (preset cpu/gpu: 1)")
    g.add_argument("--cca-lr", type=float, help="constant fine-tuning learning rate (preset: 0.1x --lr)")
    g.add_argument("--uncond-ratio", type=float, help="fraction of rows with the null class on both branches")
    g.add_argument("--collisions", choices=["positive", "mask", "resample"], help="what to do when the rolled "
                   f"negative class equals the true class; default {COMMON['collisions']}")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="train the judge "
                   "classifier and print the table (metrics.json)")
    g.add_argument("--eval-samples", type=int, help="samples per table row, balanced over classes (preset)")
    g.add_argument("--clf-epochs", type=float, help="judge classifier epochs (preset)")
    g.add_argument("--sweep", action="store_true", help="CFG-scale sweep and λ sweep (sweep.json, sweep.png)")
    g.add_argument("--sweep-cfg", type=float, nargs="+", help="CFG scales of the sweep (default: the preset's)")
    g.add_argument("--sweep-lam", type=float, nargs="+", help="λ values of the sweep, one fine-tune each")
    args = p.parse_args(argv)
    args.redo = sorted({s for r in args.retrain for s in REDO[r]})
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "bench":
            bench(args)
        else:
            run(args)
    except UserError as e:
        if RANK == 0 or not isinstance(e, Interrupted):  # under torchrun, rank 0 alone reports a Ctrl-C
            print(f"minicca: error{f' (rank {RANK})' if RANK else ''}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("minicca: interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:  # under torchrun, Gloo's "closed/reset by peer": the rank that failed said why
        if RANK == 0 or "by peer" not in str(e):
            raise
        print(f"minicca: rank {RANK} stopped: another rank failed", file=sys.stderr)
        sys.exit(1)
    finally:
        if WORLD > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
