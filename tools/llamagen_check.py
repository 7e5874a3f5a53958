"""The port of docs/porting.md on LlamaGen's own model: python tools/llamagen_check.py LLAMAGEN_DIR

LLAMAGEN_DIR is a checkout of FoundationVision/LlamaGen. This imports its
autoregressive/models/gpt.py and generate.py, builds tiny class-conditional Transformers with
random weights (every noise source on), and prints each failure of the troubleshooting table, the
fix, and the bf16 table of section 6. CPU only; about 15 seconds.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minicca as kit  # noqa: E402  (the kit: sequence_logprob, section 5, the porting kit)


def llamagen_logp(model):  # section 2 of docs/porting.md
    return lambda tokens, labels: kit.sequence_logprob(
        model(idx=tokens[:, :-1], cond_idx=labels)[0], tokens)


def tiny(ModelArgs, Transformer, seed, **kwargs):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, num_classes=10, **kwargs))
    for p in model.parameters():  # LlamaGen zero-initialises its output layer: give it weights
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def report(what, call):
    try:
        call()
    except Exception as error:  # noqa: BLE001  (the failures are the point)
        message = str(error).strip().splitlines()[-1].strip()  # load_state_dict's is the last
        print(f"{what}: {type(error).__name__}: {message[:110]}")
    else:
        print(f"{what}: no error")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llamagen_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.llamagen_dir))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer
    torch.set_num_threads(1)
    N, K = 16, 10
    base = tiny(ModelArgs, Transformer, args.seed, vocab_size=256, block_size=N,
                class_dropout_prob=0.1, drop_path_rate=0.1, attn_dropout_p=0.1)
    policy, reference = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, 256, (8, N), generator=g)
    labels = torch.randint(0, K, (8,), generator=g)
    report("logits of the tuple", lambda: kit.sequence_logprob(policy(idx=tokens[:, :-1],
                                                                     cond_idx=labels), tokens))
    report("idx = the whole sequence", lambda: kit.sequence_logprob(
        policy(idx=tokens, cond_idx=labels)[0], tokens))
    check = lambda models=(): kit.step0_self_check(  # noqa: E731
        llamagen_logp(policy), llamagen_logp(reference), tokens, labels, K, lam=10.0,
        models=models)
    print(f"self-check, every noise source on: largest gap {check()[0]:.2f}")
    with kit.no_randomness(policy, reference) as changed:
        for source in ("p", "drop_prob", "attn_dropout_p", "dropout_prob"):
            kept = [(path, name, value) for path, name, value in changed if name == source]
            for model in (policy, reference):
                modules = dict(model.named_modules())
                for path, name, value in kept:
                    setattr(modules[path], name, value)
            print(f"self-check, only {source!r} on: largest gap {check()[0]:.2f}")
            for model in (policy, reference):
                modules = dict(model.named_modules())
                for path, name, value in kept:
                    setattr(modules[path], name, 0.0)
    print("no_randomness switched off:", sorted({name for _, name, _ in changed}))
    max_gap, off_by = check(models=(policy, reference))
    print(f"self-check with models=(policy, reference): largest gap {max_gap}, "
          f"loss - closed form {off_by:.1e}; restored: {len(kit._random_settings(policy))} sources")
    no_null_row = tiny(ModelArgs, Transformer, args.seed, vocab_size=256, block_size=N,
                       class_dropout_prob=0.0)
    report("built with class_dropout_prob=0, loading the weights",
           lambda: no_null_row.load_state_dict(base.state_dict()))
    report("eval mode, idx = tokens[:, :-1]", lambda: llamagen_logp(policy.eval())(tokens, labels))
    with torch.no_grad(), kit.no_randomness(policy):
        eval_logp = kit.sequence_logprob(policy(idx=tokens, cond_idx=labels)[0][:, :-1], tokens)
        train_logp = llamagen_logp(policy.train())(tokens, labels)
    print(f"eval mode with idx = tokens, last logit dropped, against train mode without "
          f"randomness: largest difference {(eval_logp - train_logp).abs().max().item()}")
    policy.eval()
    generate(policy, labels[:2], N, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
    policy.train()
    report("training pass after generate()", lambda: llamagen_logp(policy)(tokens, labels))
    for layer in policy.layers:  # drop_kv_caches
        layer.attention.kv_cache = None
    report("the same after dropping the KV caches", lambda: llamagen_logp(policy)(tokens, labels))
    print("bf16 autocast against float32, largest |difference| of log p(x|c) over 8 rows:")
    for n in (16, 256, 576):
        model = tiny(ModelArgs, Transformer, args.seed, vocab_size=16384, block_size=n)
        x, c = torch.randint(0, 16384, (8, n), generator=g), torch.randint(0, K, (8,), generator=g)
        head = model.output

        def head_in_float32(h):
            with torch.autocast(h.device.type, enabled=False):
                return F.linear(h.float(), head.weight.float())
        with kit.no_randomness(model), torch.no_grad():
            fp32 = llamagen_logp(model)(x, c)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = llamagen_logp(model)(x, c)
                head.forward = head_in_float32
                bf16_head = llamagen_logp(model)(x, c)
                del head.forward
        error, error_head = (bf16 - fp32).abs().max(), (bf16_head - fp32).abs().max()
        print(f"  N = {n:3d}: mean log p {fp32.mean():8.0f}, bf16 autocast {error:.3f}, "
              f"head in float32 {error_head:.3f}")


if __name__ == "__main__":
    main()
