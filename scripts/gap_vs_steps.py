"""Mean PSNR gap of one run of a config at several training steps (one training, EMA snapshots at the steps).

How the default recipe was chosen (README "Why this recipe"):
    python scripts/gap_vs_steps.py --variant dit_local_head --n 10 --steps 1500,2000,2500,3000 \
        --set batch_size=8 lr=2e-3
Training settings not given with --set come from the config (default: config.yaml).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from diffbias import data as data_lib
from diffbias.config import RunKey, load_config, run_spec
from diffbias.data import prepare_dataset
from diffbias.device import set_threads
from diffbias.metrics.psnr import psnr_gap
from diffbias.train import Trainer, load_trained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--dataset", default=None, help="data set key (default: the config's first)")
    p.add_argument("--variant", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", required=True, help="comma list; the last is the training length")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="training overrides (YAML values)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    set_threads(args.threads)
    cfg = load_config(args.config)
    steps = sorted(int(s) for s in args.steps.split(","))
    for item in args.set:
        key, value = item.split("=", 1)
        cfg["training"][key] = yaml.safe_load(value)
    cfg["training"].update(steps=steps[-1], snapshot_steps=steps[:-1])
    dataset = args.dataset or next(iter(cfg["datasets"]))
    psnr_cfg = cfg["evaluation"]["psnr"]
    with tempfile.TemporaryDirectory(prefix="diffbias-gap-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data.npz"
        prepare_dataset(cfg["datasets"][dataset], str(data))
        spec = run_spec(cfg, RunKey(dataset, args.variant, args.n, args.seed))
        Trainer(spec, data, tmp / "run", tmp / "ck.pt", device="cpu").run(progress=False)
        images, _, _ = data_lib.load_prepared(data)
        train_idx, test_idx = data_lib.split_indices(len(images), args.n, cfg["datasets"][dataset]["test_size"], args.seed)
        k = psnr_cfg["num_images"]
        train = data_lib.to_model_range(images[train_idx[:k]])
        test = data_lib.to_model_range(images[test_idx[:k]])
        for path in sorted((tmp / "run" / "ema_snapshots").glob("ema_*.pt")) + [tmp / "run" / "model.pt"]:
            model, ckpt = load_trained(path)
            df = psnr_gap(model, train, test, respacing=psnr_cfg["respacing"], noise_seed=psnr_cfg["noise_seed"],
                          clip=psnr_cfg["clip"])
            print(f"{args.variant} N={args.n} seed={args.seed} step {ckpt['step']}: mean gap {df['gap'].mean():.3f} dB "
                  f"(max {df['gap'].max():.2f} dB)", flush=True)


if __name__ == "__main__":
    main()
