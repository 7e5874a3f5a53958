"""Over-fitting curve: bits per token on training and test tokens along a preset's pretraining.

    python tools/overfit_curve.py [--dataset D] [--device D] [--preset P] [--steps S]
                                  [--vq-steps V] [--every E] [--seed S]

Trains the preset's tokenizer, encodes every image, then pretrains the preset's GPT and, every
`--every` steps and at the last, prints the bits per token (true classes, dropout off, under the
precision the training uses) on the first 2,000 training sequences and on all the test ones, with
the epochs seen so far. Test bits falling, then rising while train bits keep falling, is the GPT
learning its training images by heart. `--steps` sets the length of the cosine schedule too, so a
shorter run is not the first part of a longer one.

docs/results.md's curve of the gpu preset on the 12,000-image subset (`bash .ci/gpu_check prepare`),
on one H200, is what this command computes:

    python tools/overfit_curve.py --device cuda --steps 8000 --vq-steps 2000 --every 500

with one difference: the run that made it left the tokenizer's initial weights unseeded (torch's
global generator starts from a random seed in each process), so a rerun matches it in shape, not
to the digit. Here --seed seeds them, so two runs print the same lines on a CPU (on a GPU,
non-deterministic CUDA kernels can still move them apart).

Maintainer tool: it imports minicca and writes no file; the printed lines are the result.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minicca  # noqa: E402

TRAIN_SEQUENCES = 2000  # train bits on as many sequences as the subset's test set has


class Curve(minicca.Hooks):
    """Prints a line of the curve after every `every` steps and after the last one."""

    def __init__(self, train, test, every, steps_per_epoch, precision, device, t0):
        self.train, self.test, self.every = train, test, every  # (tokens, labels) pairs
        self.steps_per_epoch, self.precision = steps_per_epoch, precision
        self.device, self.t0 = device, t0

    def after_step(self, model, optimizer, history, num_steps):
        step = len(history)
        if step % self.every and step != num_steps:
            return
        with minicca.autocast(self.device, self.precision):
            train = minicca.bits_per_token(model, *self.train, self.device)
            test = minicca.bits_per_token(model, *self.test, self.device)
        model.train()  # bits_per_token left it in eval mode: dropout back on for training
        print(f"step {step:6d} epoch {step / self.steps_per_epoch:6.1f}: bits/token train "
              f"{train:.3f} test {test:.3f}  ({time.time() - self.t0:.0f} s)", flush=True)


def overfit_curve(args):
    """Trains the tokenizer and the GPT, printing the curve as the GPT trains."""
    device = minicca.pick_device(args.device)
    data = minicca.load_dataset(args.dataset)
    settings = {**minicca.COMMON, **minicca.PRESETS[args.preset]}
    settings["steps"] = args.steps or settings["steps"]
    settings["vq_steps"] = args.vq_steps or settings["vq_steps"]
    settings["precision"] = minicca.resolve_precision(None, device)  # bf16 on CUDA, as the CLI's
    # The tokenizer's initial weights come from torch's global generator, which starts from a
    # random seed in each process. The training steps reseed from --seed themselves, and the GPT's
    # initial weights follow from the tokenizer's last step, so this one seed fixes the curve.
    torch.manual_seed(args.seed)
    t0 = time.time()
    ckpt = minicca.train_tokenizer(data, settings, args.seed, device)
    tokenizer = minicca.VQTokenizer(minicca.VQConfig(**ckpt["vq_config"])).to(device)
    tokenizer.load_state_dict(ckpt["model"])
    tokenizer.eval()
    train = minicca.encode_all(tokenizer, data["x_train"], device)
    test = minicca.encode_all(tokenizer, data["x_test"], device)
    y_train, y_test = torch.as_tensor(data["y_train"]), torch.as_tensor(data["y_test"])
    print(f"tokenizer {time.time() - t0:.0f} s; tokens {tuple(train.shape)}", flush=True)
    batch = min(settings["batch_size"], len(train))  # what train_gpt uses
    curve = Curve((train[:TRAIN_SEQUENCES], y_train[:TRAIN_SEQUENCES]), (test, y_test),
                  args.every, len(train) / batch, settings["precision"], device, t0)
    classes = len(data["classes"])  # 10 for CIFAR-10, which the curve's run wrote as a constant
    minicca.train_gpt(train, y_train, classes, settings, args.seed, device, curve)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="data/cifar10_gpu_check.npz",
                   help="mnist | cifar10 | path/to/data.npz | tiny (default: the GPU check's "
                   "CIFAR-10 subset, made by bash .ci/gpu_check prepare path/to/cifar10.npz)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto (the default): CUDA, else MPS, else the CPU")
    p.add_argument("--preset", choices=list(minicca.PRESETS), default="gpu",
                   help="the tokenizer's and the GPT's settings (default: gpu; on a CPU it takes "
                   "hours: try cpu_rgb or micro there)")
    p.add_argument("--steps", type=int, default=None,
                   help="GPT steps, also the cosine schedule's length (default: the preset's)")
    p.add_argument("--vq-steps", type=int, default=None,
                   help="tokenizer steps (default: the preset's)")
    p.add_argument("--every", type=int, default=500,
                   help="steps between lines of the curve (default: 500)")
    p.add_argument("--seed", type=int, default=0,
                   help="the initial weights' and the training batches' seed (default: 0)")
    args = p.parse_args(argv)
    for flag in ("steps", "vq_steps", "every"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    try:
        overfit_curve(args)
    except minicca.UserError as e:
        subset = args.dataset == p.get_default("dataset") and not os.path.exists(args.dataset)
        hint = "; make it: bash .ci/gpu_check prepare path/to/cifar10.npz" if subset else ""
        print(f"overfit_curve: error: {e}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
