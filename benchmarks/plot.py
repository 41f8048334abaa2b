"""The bar chart of docs/benchmarks.md: train-step throughput of every variant bench.py timed.

    python benchmarks/plot.py digits.json cifar10.json --out docs/benchmarks.png
"""
from __future__ import annotations

import argparse
import json

from unet_flax.visualize import save_bar_chart


def groups_from(result: dict) -> list[tuple[str, list[tuple[str, float]]]]:
    groups = []
    for dtype, run in result["runs"].items():
        title = (f"{result['preset']}, {result['device']} ({result['device_kind']}), {dtype}, batch "
                 f"{result['batch_size']}: train step, images/s (JAX / PyTorch step time "
                 f"{run['jax_over_torch_step_time']:.2f})")
        groups.append((title, [(name.replace("_", " "), run[f"{name}_img_per_s"]) for name in run["timed"]]))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="JSON files written by bench.py --json")
    parser.add_argument("--out", default="docs/benchmarks.png")
    args = parser.parse_args()
    groups = []
    for path in args.results:
        with open(path) as f:
            groups += groups_from(json.load(f))
    save_bar_chart(groups, args.out, unit="img/s")


if __name__ == "__main__":
    main()
