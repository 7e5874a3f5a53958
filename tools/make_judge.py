"""Make a reference judge: python tools/make_judge.py --dataset D [--judge-epochs E] [--out F].

Trains minicca's one judge network and recipe (JudgeNet, train_judge) on D's training images,
measures it on D's test images, and stores it with float16 weights and how it was made (the file
format minicca.load_judge reads). The shipped tiny_data/judge_*.pt came from this recipe; the
commands are in tiny_data/README.md.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minicca  # noqa: E402


def judge_accuracy(judge, data, device):
    """Test accuracy, single view and averaged with the mirrored image (flip test-time averaging:
    what minicca.classify uses for a loaded RGB judge; None for one channel)."""
    y = torch.from_numpy(data["y_test"])
    probs = minicca.classify(judge, data["x_test"], device)[1]
    single = probs.argmax(1).eq(y).float().mean().item()
    if data["x_test"].shape[3] != 3:
        return single, None
    mirrored = minicca.classify(judge, minicca.to_float(data["x_test"]).flip(3), device)[1]
    return single, (probs + mirrored).argmax(1).eq(y).float().mean().item()


def bf16_is_fast(device):
    """CUDA, and CPUs with AVX-512 BF16 / AMX (about 3x faster convolutions; elsewhere emulated)."""
    if device.type == "cuda":
        return True
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return device.type == "cpu" and check is not None and check()


def machine(device):
    """Where it was measured: the CPU model and threads, or the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=None, help="mnist | cifar10 | path/to/data.npz")
    p.add_argument("--data-root", default="data")
    p.add_argument("--judge-epochs", type=float, default=None,
                   help="passes over the training images (default: minicca's, by channels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--out", default=None, help="default tiny_data/judge_<dataset>.pt")
    args = p.parse_args(argv)
    command = " ".join(["python tools/make_judge.py", *(sys.argv[1:] if argv is None else argv)])
    device = minicca.pick_device(args.device)
    data = minicca.load_dataset(args.dataset, args.data_root)
    name = minicca.dataset_name(args.dataset)
    out = args.out or os.path.join(minicca.HERE, "tiny_data", f"judge_{name}.pt")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    H, W, C = data["x_train"].shape[1:]
    epochs = args.judge_epochs or minicca.JUDGE_RECIPE["epochs"][C]
    print(f"make_judge: {len(data['x_train'])} train / {len(data['x_test'])} test images "
          f"{H}x{W}x{C}, {len(data['classes'])} classes; {epochs:g} epochs on {device}; out {out}")
    t0 = time.time()
    precision = "bf16" if bf16_is_fast(device) else "fp32"  # where bf16 is fast, the judge uses it
    trained = minicca.train_judge(data, epochs, minicca.COMMON["judge_width"], args.seed, device,
                                  precision=precision)
    seconds = time.time() - t0
    judge = minicca.JudgeNet(C, len(data["classes"]), minicca.COMMON["judge_width"])
    judge.load_state_dict(trained["model"])
    judge = judge.float().eval()
    half = {k: v.half() if v.is_floating_point() else v for k, v in judge.state_dict().items()}
    judge.load_state_dict(half)  # measure the weights that are shipped: float16, rounded
    single, flip = judge_accuracy(judge, data, torch.device("cpu"))
    info = {"classes": [str(c) for c in data["classes"]], "image_shape": [H, W, C],
            "test_accuracy": single, "test_accuracy_flip": flip, "epochs": epochs,
            "seed": args.seed, "data": minicca.fingerprint(data), "command": command,
            "seconds": seconds, "machine": machine(device),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    minicca.save_checkpoint({"model": half, "judge_config": judge.config, "info": info}, out)
    views = (f", {flip:.2%} with flip averaging (what classify and evaluate use for RGB)"
             if flip is not None else " (what classify and evaluate use)")
    print(f"[judge] test accuracy {single:.2%} single view{views}; trained in "
          f"{seconds / 60:.1f} min; wrote {out} ({os.path.getsize(out) / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
