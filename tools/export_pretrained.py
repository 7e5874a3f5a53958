"""Export a run's checkpoints as the reference ones: python tools/export_pretrained.py RUN_DIR.

Copies RUN_DIR's tokenizer.pt, gpt.pt and the CCA fine-tune of the preset's defaults into
tiny_data/pretrained (or --dest), float weights stored as float16 to halve their size;
`python minicca.py --pretrained` starts from them. The shipped ones come from the default run
(`python minicca.py --out RUN_DIR`, the cpu preset); the commands are in tiny_data/README.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minicca  # noqa: E402


def export_pretrained(run_dir, dest=minicca.PRETRAINED, preset="cpu"):
    os.makedirs(dest, exist_ok=True)
    cca_file = minicca.cca_name({**minicca.COMMON, **minicca.PRESETS[preset]}) + ".pt"
    for f in ["tokenizer.pt", "gpt.pt", cca_file]:  # the judge is shipped on its own
        ckpt = minicca.load_checkpoint(os.path.join(run_dir, f))
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v
                         for k, v in ckpt["model"].items()}
        minicca.save_checkpoint(ckpt, os.path.join(dest, f))
        size = os.path.getsize(os.path.join(dest, f)) / 2**20
        print(f"{os.path.join(dest, f)}: {size:.2f} MiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the --out folder of the run to export")
    p.add_argument("--dest", default=minicca.PRETRAINED, help="default tiny_data/pretrained")
    p.add_argument("--preset", choices=list(minicca.PRESETS), default="cpu",
                   help="the run's preset: names its CCA file (default cpu, the default run)")
    args = p.parse_args(argv)
    export_pretrained(args.run_dir, args.dest, args.preset)


if __name__ == "__main__":
    main()
