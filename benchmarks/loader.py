"""Measure the input pipeline: loader throughput against grain worker count, and start-up time and peak
memory against the number of images in a folder.

    python benchmarks/loader.py throughput --kind png32 --workers 0,1,2,4
    python benchmarks/loader.py throughput --kind jpeg256 --image-size 128 --workers 0,1,2,4
    python benchmarks/loader.py startup --counts 1000,20000,100000

Folders of random images are written once under --cache (default /tmp/unet_flax_loader). Each start-up
figure comes from a fresh process: the time from `load()` to the first batch in hand, and that process's
peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unet_flax import input_pipeline

KINDS = {"png32": (32, "png"), "jpeg256": (256, "jpg")}


def make_folder(root: Path, kind: str, count: int) -> Path:
    """`count` random images in 10 class folders (written once; reused when already complete)."""
    size, suffix = KINDS[kind]
    folder = root / f"{kind}_{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    # Smooth random images compress like photographs do, unlike white noise.
    base = rng.integers(0, 255, (64, size // 8, size // 8, 3), dtype=np.uint8)
    for i in range(count):
        path = folder / f"class_{i % 10}" / f"{i:06d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base[i % 64]).resize((size, size), Image.BILINEAR).save(path, quality=90)
    done.touch()
    return folder


def throughput(folder: Path, image_size: int, workers: int, batch_size: int, batches: int) -> float:
    """Images per second served by the pipeline, after two warm-up batches (worker start-up excluded)."""
    data = input_pipeline.load(str(folder), image_size)
    iterator = input_pipeline.batches_from(input_pipeline.make_dataset(data, batch_size, seed=0, hflip=True),
                                           0, workers)
    try:
        for _ in range(2):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch_size / (time.perf_counter() - start)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def startup(folder: Path, image_size: int, workers: int) -> dict:
    """In this process: seconds from load() to the first batch, the seconds closing the iterator takes
    once its workers have filled their buffers, and peak resident memory."""
    start = time.perf_counter()
    data = input_pipeline.load(str(folder), image_size)
    listed = time.perf_counter() - start
    iterator = input_pipeline.batches_from(input_pipeline.make_dataset(data, 128, seed=0), 0, workers)
    next(iterator)
    first_batch = time.perf_counter() - start
    time.sleep(2)  # the workers fill their buffers, as during a run's last steps
    start = time.perf_counter()
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return {"images": len(data), "listed_s": round(listed, 3), "first_batch_s": round(first_batch, 3),
            "close_s": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("throughput", "startup", "startup-one"))
    parser.add_argument("--kind", choices=sorted(KINDS), default="png32")
    parser.add_argument("--image-size", type=int, default=None, help="default: the images' own size")
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--count", type=int, default=4096, help="images in the throughput folder")
    parser.add_argument("--counts", default="1000,20000,100000")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--cache", default="/tmp/unet_flax_loader")
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    image_size = args.image_size or KINDS[args.kind][0]
    workers = [int(w) for w in args.workers.split(",")]
    if args.what == "startup-one":
        print(json.dumps(startup(Path(args.folder), image_size, workers[0])))
        return
    if args.what == "throughput":
        folder = make_folder(Path(args.cache), args.kind, args.count)
        for count in workers:
            rate = throughput(folder, image_size, count, args.batch_size, args.batches)
            print(json.dumps({"kind": args.kind, "image_size": image_size, "workers": count,
                              "img_per_s": round(rate, 1)}), flush=True)
        return
    for count in (int(c) for c in args.counts.split(",")):
        folder = make_folder(Path(args.cache), args.kind, count)
        out = subprocess.run([sys.executable, __file__, "startup-one", "--folder", str(folder), "--kind", args.kind,
                              "--image-size", str(image_size), "--workers", str(workers[0])],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
