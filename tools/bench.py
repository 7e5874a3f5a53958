"""Sampling and training speed, measured side by side in one run (ratios, not timed tests):
python tools/bench.py [--device D] [--preset P] [--seed S] [any other minicca.py flag].

Guidance-free against CFG sampling (the same batch, equal rows per forward, each at its best batch),
the KV cache against recomputing, a CCA step against a pretraining step, and the peak memory of each
phase, for the GPT that minicca.py's settings describe (random weights: speed does not depend on
them). It takes minicca.py's flags (--help lists them); docs/results.md's speed tables are its
output.
"""
import contextlib
import copy
import functools
import math
import os
import sys
import time
import unittest.mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minicca  # noqa: E402
from make_judge import bf16_is_fast  # noqa: E402  (tools/ is this script's folder)


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
    """Peak bytes fn() adds: CUDA allocator statistics on a GPU; on Linux CPUs the growth of peak
    resident memory (VmHWM, reset through /proc/self/clear_refs); None where neither exists."""
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
    """Guidance-free vs CFG sampling, KV cache vs recompute, pretraining vs CCA steps, for the
    preset's model (random weights: speed does not depend on them)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise minicca.UserError("bench measures one process: run it with python, not torchrun")
    device = minicca.pick_device(args.device)
    settings = minicca.checked_settings(args, minicca.chosen_preset(args, device), device)
    if device.type == "cpu":
        with contextlib.suppress(OSError, AttributeError):
            # glibc: large blocks by mmap, so freed tensors leave resident memory and the peak
            # of each phase is visible. M_MMAP_THRESHOLD = 64 KiB.
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    torch.manual_seed(args.seed)
    data = minicca.load_dataset(args.dataset, args.data_root)
    (H, W, _), K = data["x_train"].shape[1:], len(data["classes"])
    N = (H // 4) * (W // 4)
    gpt_config = minicca.GPTConfig(settings["codebook_size"], K, N, settings["n_layer"],
                           settings["n_head"], settings["n_embd"])
    model = minicca.GPT(gpt_config).to(device).eval()
    w = settings["cfg"] if settings["cfg"] != 1.0 else 1.5
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"bench: {millions:.2f}M-parameter GPT, N={N} tokens, device {device} ({where}), "
          f"torch {torch.__version__}, CFG w={w:g}")
    results = bench_sampling(model, w, settings, device)
    results.update(bench_training(model, settings, device, results["batch_for_memory"], w))
    report_bench(results, settings, device, len(data["x_train"]))
    results["bf16"] = bench_precision(model, data, settings, device, args.seed)
    return results


def sampler(model, B, scale, device, cache=True):
    """A function that samples B images (classes 0, 1, ...) with a fixed seed."""
    labels = torch.arange(B, device=device) % model.config.num_classes

    def sample():
        gen = torch.Generator(device).manual_seed(0)
        return minicca.generate(model, labels, scale, use_cache=cache, generator=gen)
    return sample


def bench_sampling(model, w, settings, device):
    """Images per second guidance-free and with CFG at three batch sizes; KV cache vs recompute."""
    if settings["n_embd"] < 64:
        batches = [4, 16, 64]
    else:
        batches = [16, 64, 256] if device.type == "cpu" else [64, 256, 1024]
    gf, cfg, gf2 = {}, {}, {}
    for B in batches:
        with minicca.autocast(device, settings["precision"]):
            cfg[B] = B / timed(sampler(model, B, w, device), device)
            gf[B] = B / timed(sampler(model, B, 1.0, device), device)
            gf2[B] = 2 * B / timed(sampler(model, 2 * B, 1.0, device), device)
        print(f"  batch {B:>5}: guidance-free {gf[B]:8.1f} img/s, CFG {cfg[B]:8.1f} img/s; same "
              f"batch {gf[B] / cfg[B]:.2f}x; equal rows per forward (guidance-free at {2 * B}) "
              f"{gf2[B] / cfg[B]:.2f}x")
    last = batches[-1]
    B = batches[1]
    with minicca.autocast(device, settings["precision"]):
        recompute = timed(sampler(model, B, 1.0, device, cache=False), device, 1)
        cached = timed(sampler(model, B, 1.0, device), device, 1)
    return {"equal_rows": gf2[last] / cfg[last],
            "best_batch": max({**gf, **gf2}.values()) / max(cfg.values()),
            "same_batch": gf[last] / cfg[last], "kv_cache": recompute / cached,
            "batches": batches, "batch_for_memory": B}


def bench_training(model, settings, device, B, w):
    """Seconds per pretraining and per CCA step at the preset's batch; peak memory of each phase."""
    V, N, K = model.config.vocab_size, model.config.block_size, model.config.num_classes
    tokens = torch.randint(0, V, (settings["batch_size"], N), device=device)
    labels = torch.arange(settings["batch_size"], device=device) % K
    policy = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = minicca.adamw(policy, 1e-5, 0.0)

    def train_step(cca):
        with minicca.autocast(device, settings["precision"]):
            if cca:
                loss = minicca.cca_step_loss(policy, reference, tokens, labels)[0]
            else:
                logits = policy(tokens, labels).float()
                loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_pre = timed(lambda: train_step(False), device)
    t_cca = timed(lambda: train_step(True), device)
    phases = [("pretrain step", lambda: train_step(False)), ("CCA step", lambda: train_step(True)),
              ("CFG sampling", sampler(model, B, w, device)),
              ("guidance-free sampling", sampler(model, B, 1.0, device))]
    memory = {name: peak_memory(fn, device) for name, fn in phases}
    return {"t_pre": t_pre, "t_cca": t_cca, "tokens_per_step": settings["batch_size"] * N,
            "memory": memory}


def clock(device):
    """Seconds now, once the GPU's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_precision(model, data, settings, device, seed, steps=20, rounds=2):
    """Seconds per step of the real training functions (tokenizer, pretraining, CCA) and of
    guidance-free sampling under bf16 autocast against fp32: the measurement --precision asks
    for, since a CPU's bf16 may be emulated or slower in some kernels. The two precisions
    alternate (fp32, bf16, fp32, bf16) and each keeps its fastest round, so both see the same
    machine. Prints and returns {stage: fp32 seconds / bf16 seconds} (above 1: bf16 is faster)."""
    subset = {k: v[:4 * settings["vq_batch"]] for k, v in data.items() if k.startswith("x_")}
    subset["classes"] = data["classes"]
    V, N, K = model.config.vocab_size, model.config.block_size, model.config.num_classes
    B = settings["batch_size"]
    tokens = torch.randint(0, V, (4 * B, N), generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(4 * B) % K

    def sample(s):
        with minicca.autocast(device, s["precision"]):
            for _ in range(steps // 10):
                minicca.generate(model, torch.arange(256, device=device) % K)

    runs = {  # (what runs, how many steps it runs)
        "tokenizer step": (lambda s: minicca.train_tokenizer(subset, {**s, "vq_steps": steps},
                                                             seed, device), steps),
        "pretraining step": (lambda s: minicca.train_gpt(tokens, labels, K, {**s, "steps": steps},
                                                         seed, device), steps),
        "CCA step": (lambda s: minicca.finetune_cca(
            model, tokens, labels, {**s, "cca_epochs": steps / 4, "cca_batch_size": None}, seed,
            device), steps),
        "guidance-free sampling, a batch of 256": (sample, steps // 10)}
    best = {(name, p): math.inf for name in runs for p in ("fp32", "bf16")}
    no_bars = functools.partial(minicca.tqdm, disable=True)
    with unittest.mock.patch.object(minicca, "tqdm", no_bars):
        for _ in range(rounds):
            for name, (run, count) in runs.items():
                for precision in ("fp32", "bf16"):
                    t0 = clock(device)
                    run({**settings, "precision": precision})
                    seconds = (clock(device) - t0) / count
                    best[name, precision] = min(best[name, precision], seconds)
    print(f"bf16 autocast against fp32 (seconds per step or per sampled batch, the faster of "
          f"{rounds} rounds; bf16 units here: {bf16_is_fast(device)}):")
    ratios = {}
    for name in runs:
        fp32, bf16 = best[name, "fp32"], best[name, "bf16"]
        ratios[name] = fp32 / bf16
        print(f"  {name}: fp32 {fp32:.3g} s, bf16 {bf16:.3g} s: bf16 {ratios[name]:.2f}x as fast")
    return ratios


def report_bench(results, settings, device, n_train):
    """The ratios and the peak memory of each phase."""
    last, B = results["batches"][-1], results["batch_for_memory"]
    t_pre, t_cca = results["t_pre"], results["t_cca"]
    tokens = results["tokens_per_step"]
    print(f"  training at batch {settings['batch_size']}: pretraining {tokens / t_pre:,.0f} "
          f"tokens/s, CCA {tokens / t_cca:,.0f} tokens/s (the theory says about "
          f"2.7x slower)")
    cca_steps = math.ceil(n_train / settings["batch_size"])
    epoch_share = 100 * cca_steps * t_cca / (settings["steps"] * t_pre)
    print("ratios:")
    print(f"  guidance-free / CFG sampling, equal rows ({2 * last}):       "
          f"{results['equal_rows']:.2f}x  (at most 2x)")
    print(f"  guidance-free / CFG sampling, each at its best batch:  {results['best_batch']:.2f}x")
    print(f"  guidance-free / CFG sampling, same batch {last}:          "
          f"{results['same_batch']:.2f}x")
    print(f"  KV cache / full recompute, batch {B}:                 {results['kv_cache']:.2f}x")
    print(f"  CCA step / pretraining step time:                     {t_cca / t_pre:.2f}x  "
          f"(theory ~2.7x)")
    print(f"  one CCA epoch ({n_train} images) / pretraining ({settings['steps']} steps): "
          f"{epoch_share:.1f}%")
    print("peak memory:")
    for name, size in results["memory"].items():
        print(f"  {name}: {size / 2**20:.1f} MiB" if size is not None else f"  {name}: n/a here")
    if device.type == "cpu":
        print("  (CPU: growth of peak resident memory)")


def main(argv=None):
    args = minicca.parse_args(argv)
    try:
        if args.command != "run":
            raise minicca.UserError(f"tools/bench.py takes minicca.py's flags, not its command "
                                    f"{args.command!r}")
        bench(args)
    except minicca.UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
