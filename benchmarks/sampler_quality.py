"""Sample quality against sampling cost on the digits demo: the Frechet distance over its real-data floor
and the class agreement (evaluate.py's measures) of each sampler at 5, 10, 20 and 50 steps, and of DDPM over
all timesteps (each sampler's images/s: benchmarks/sampler_speed.py).

    python train.py --workdir runs/digits
    python benchmarks/sampler_quality.py --workdir runs/digits --json docs/bench/sampler_quality.json \\
        --plot docs/sampler_quality.png

Every cell samples evaluate.py's 1,347 images (EMA weights, the run's guidance scale, seed 0) in three
batches of 449.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

from unet_flax import evaluation
from unet_flax.checkpoint import load_params
from unet_flax.config import SamplerConfig, SamplingConfig, TrainConfig
from unet_flax.runtime import use_xla_cpu_convolutions
from unet_flax.sampling import sample
from unet_flax.visualize import save_line_chart

SAMPLERS = {
    "DDIM": SamplerConfig("ddim"),
    "DPM-Solver++ 2M": SamplerConfig("dpm_solver"),
    "DPM-Solver++ 2M Karras": SamplerConfig("dpm_solver", use_karras_sigmas=True),
    "DPM-Solver++ 3M": SamplerConfig("dpm_solver", solver_order=3),
    "DPM-Solver++ 2M SDE": SamplerConfig("dpm_solver", algorithm_type="sde-dpmsolver++"),
    "UniPC": SamplerConfig("unipc"),
    "Euler": SamplerConfig("euler"),
    "Euler ancestral": SamplerConfig("euler_ancestral"),
    "Heun": SamplerConfig("heun"),
}
STEPS = (5, 10, 20, 50)
NUM_SAMPLES, BATCH = 1347, 449
PLOTTED_RATIO = 4.0


def measure(params, config: TrainConfig, sampler: SamplerConfig, steps: int) -> dict:
    start = time.perf_counter()
    samples = sample(params, config, SamplingConfig(num_samples=NUM_SAMPLES, sampler=sampler, sampling_steps=steps,
                                                    batch_size=BATCH))
    wall_s = time.perf_counter() - start
    quality = evaluation.sample_quality(samples.images, samples.labels)
    return {"steps": samples.settings["sampling_steps"], "model_evaluations": samples.settings["model_evaluations"],
            "fd": quality["fd"], "fd_real_floor": quality["fd_real_floor"], "fd_ratio": quality["fd_ratio"],
            "class_agreement": quality["class_agreement"], "wall_s_with_compile": round(wall_s, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| sampler | steps | model evaluations | fd | fd / floor | class agreement |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['model_evaluations']} | {row['fd']:.2f} | "
                     f"{row['fd_ratio']:.2f} | {row['class_agreement']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """FD / floor against model evaluations, a line per sampler; cells above PLOTTED_RATIO are left out
    (the table has them) so that the rest stay readable."""
    kept = [row for row in rows if row["fd_ratio"] <= PLOTTED_RATIO]
    names = dict.fromkeys(r["sampler"] for r in kept)
    series = {name: ([r["model_evaluations"] for r in kept if r["sampler"] == name],
                     [r["fd_ratio"] for r in kept if r["sampler"] == name]) for name in names}
    save_line_chart(series, path, "model evaluations", "FD / floor", log_x=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/digits")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="FD / floor against model evaluations, a line per sampler")
    parser.add_argument("--replot", default=None, help="only draw --plot from the JSON an earlier run wrote")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text())["rows"], args.plot)
        return
    use_xla_cpu_convolutions()
    params, fields, step = load_params(args.workdir)
    config = TrainConfig.from_dict(fields)
    rows = []
    for name, sampler in SAMPLERS.items():
        for steps in STEPS:
            rows.append({"sampler": name, **measure(params, config, sampler, steps)})
            print(json.dumps(rows[-1]), flush=True)
    rows.append({"sampler": "DDPM", **measure(params, config, SamplerConfig("ddpm"), config.timesteps)})
    print(json.dumps(rows[-1]), flush=True)
    result = {"workdir": args.workdir, "checkpoint_step": step, "guidance_scale": config.guidance_scale,
              "num_samples": NUM_SAMPLES, "machine": platform.processor() or platform.machine(),
              "devices": [str(d) for d in jax.devices()], "rows": rows}
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)

if __name__ == "__main__":
    main()
