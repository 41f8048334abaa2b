"""train.py's own images/s on packed data, against bench.py's JAX step of the same preset and precision.

    python benchmarks/train_speed.py --preset cifar10 --bench-json docs/bench/cifar10_h100.json \
        --json docs/bench/train_speed_h100.json [--steps 300] [-- more train.py flags]

Random uint8 images of the preset's size, packed into ArrayRecord shards (`python -m unet_flax.scripts.pack`),
then `train.py --preset PRESET --data SHARDS` in bf16 for `--steps` steps (a checkpoint only at the end, 8
samples of 2 steps): train.py's img/s is its last logging interval's, after the compile; bench.py's is
`jax_img_per_s` for bfloat16 in `--bench-json`. What the loop adds to the step (the input pipeline, the
transfer, metrics, logging) is the difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unet_flax.config import PRESETS  # noqa: E402


def packed_random_images(preset: str, folder: Path, count: int) -> Path:
    model = PRESETS[preset].model
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, model.image_size, model.image_size, model.in_channels), np.uint8)
    np.savez(folder / "images.npz", images=images, labels=rng.integers(0, 10, count))  # for class-conditional presets
    shards = folder / "shards"
    subprocess.run([sys.executable, "-m", "unet_flax.scripts.pack", str(folder / "images.npz"), "--out", str(shards),
                    "--image-size", str(model.image_size)], check=True, cwd=ROOT)
    return shards


def train_img_per_s(preset: str, shards: Path, workdir: Path, steps: int, extra: list[str]) -> dict:
    command = [sys.executable, "train.py", "--preset", preset, "--data", str(shards), "--workdir", str(workdir),
               "--dtype", "bfloat16", "--steps", str(steps), "--log-every", str(max(1, steps // 3)),
               "--save-every", str(steps), "--num-samples", "8", "--sampling-steps", "2", *extra]
    print(" ".join(command), flush=True)
    finished = subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    parser.add_argument("--bench-json", type=Path, required=True, help="bench.py's --json of the same preset")
    parser.add_argument("--json", type=Path, required=True, help="where the comparison is written")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=20_000, help="random images packed")
    parser.add_argument("train_args", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()
    bench_file = json.loads(args.bench_json.read_text())
    bench = bench_file["runs"]["bfloat16"]
    with tempfile.TemporaryDirectory(prefix="unet_flax_train_speed_") as folder:
        shards = packed_random_images(args.preset, Path(folder), args.images)
        summary = train_img_per_s(args.preset, shards, Path(folder) / "run", args.steps, args.train_args)
    result = {"preset": args.preset, "steps": args.steps, "train_py_img_per_s": summary["img_per_s"],
              "bench_jax_img_per_s": bench["jax_img_per_s"], "bench_batch_size": bench_file["batch_size"],
              "train_args": args.train_args,
              "train_py_over_bench": summary["img_per_s"] / bench["jax_img_per_s"]}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
