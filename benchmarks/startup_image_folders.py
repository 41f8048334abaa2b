"""Start-up against folder size: train.py end to end for a few steps on image folders of different sizes,
as a user runs it (default data workers), alternated, several rounds; the ratio of the median wall times.

    python benchmarks/startup_image_folders.py                          # 1,000 and 20,000 JPEGs, 256 px read at 128
    python benchmarks/startup_image_folders.py --counts 1000,100000 --rounds 5

Each run is a fresh process: start, listing the folder (every file's colour mode from its header), the
compile (from the cache after the first round, which is reported but left out of the medians), the steps,
a one-image sample grid, and closing the data workers. Folders are written once by benchmarks/loader.py.
A ratio near 1 is the goal: nothing at start-up or shut-down should grow with the folder beyond listing it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loader import KINDS, make_folder

ROOT = Path(__file__).resolve().parents[1]


def run_train(folder: Path, image_size: int, steps: int) -> dict:
    """One train.py run in a fresh workdir: its wall time and peak resident memory (the main process)."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, str(ROOT / "train.py"), "--data", str(folder), "--image-size", str(image_size),
                   "--attention-resolutions", str(image_size // 4), "--batch-size", "8", "--steps", str(steps),
                   "--log-every", "1", "--warmup-steps", "1", "--num-samples", "1", "--sampling-steps", "1",
                   "--workdir", workdir]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"train.py failed on {folder}: {process.stderr.read()[-2000:]}")
    return {"wall_s": round(wall, 2), "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,20000", help="folder sizes, the first the baseline of the ratio")
    parser.add_argument("--kind", choices=sorted(KINDS), default="jpeg256")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default="/tmp/unet_flax_loader", help="where the folders are written once")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    folders = {count: make_folder(Path(args.cache), args.kind, count) for count in counts}
    runs = {count: [] for count in counts}
    for round_ in range(1, args.rounds + 1):
        for count in counts:
            result = run_train(folders[count], args.image_size, args.steps)
            runs[count].append(result)
            print(f"round {round_} images {count}: {result['wall_s']} s, {result['max_rss_mb']} MB", flush=True)
    medians = {count: statistics.median(r["wall_s"] for r in results[1:] or results) for count, results in runs.items()}
    report = {"kind": args.kind, "image_size": args.image_size, "steps": args.steps, "runs": runs,
              "median_wall_s_after_round_1": medians,
              "ratio_to_first": {count: round(medians[count] / medians[counts[0]], 3) for count in counts}}
    print(json.dumps(report["ratio_to_first"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
