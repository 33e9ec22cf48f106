"""Diffusion benchmarks: fine-tuning step time per objective, and CGS against independent sampling.

    python scripts/bench_diffusion.py                        # digits, IPC 10, conf/diffusion/pixel.yaml
    python scripts/bench_diffusion.py --steps 10 --sample-steps 20 --threads 1

Two tables on the digits pixel UNet of conf/diffusion/pixel.yaml (1x16x16):
1. seconds per fine-tuning step (plain, rsm, minimax) at diffusion.finetune.batch_size,
   on the real digits train split, after warm-up steps;
2. sampling IPC x 10 classes with diffusion.sample's scheduler, steps and guidance:
   wall time and peak RSS growth of independent (batched) vs CGS (a class at a time,
   DPP + DM guidance after every step), and the ratio (target: CGS <= 1.5x).
Every case runs in a fresh subprocess so ru_maxrss is the case's own. Timing does not
depend on the weights or on the real class means, so the UNet is freshly initialised and
the means are random (with the right shapes). Numbers are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.config.compat import typed
from ddist.config.schema import FinetuneConfig, NoiseScheduleConfig, PixelDiffusionConfig, SampleConfig
from ddist.data import dataset_spec, load_split
from ddist.diffusion.sampling import CgsReference, make_scheduler, sample_latents
from ddist.logging import RunLogger
from ddist.models.diffusion import PixelCodec, fresh_denoiser
from ddist.training.denoiser import Phase, TrainData, train_denoiser

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("plain", "rsm", "minimax")
METHODS = ("independent", "cgs")
WARMUP = 2


def diffusion_config(ipc: int, sample_steps: int | None) -> tuple[dict, dict, int]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["dataset=digits", "diffusion=pixel", f"ipc={ipc}", "paths.root_dir=.", "paths.output_dir=."],
        )
    dcfg = OmegaConf.to_container(cfg.diffusion, resolve=True)
    if sample_steps:
        dcfg["sample"]["steps"] = sample_steps
    return OmegaConf.to_container(cfg.dataset, resolve=True), dcfg, ipc


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finetune_case(objective: str, args) -> dict:
    dataset, dcfg, _ = diffusion_config(args.ipc, args.sample_steps)
    spec, ds = dataset_spec(dataset), load_split(dataset, "train")
    denoiser = fresh_denoiser(
        typed(PixelDiffusionConfig, dcfg), spec.num_classes, spec.channels, spec.resolution, PixelCodec()
    )
    tcfg = dcfg["finetune"]

    def fit(steps):
        return train_denoiser(
            denoiser,
            PixelCodec(),
            make_scheduler(typed(NoiseScheduleConfig, dcfg["schedule"]), "ddpm"),
            TrainData(ds, spec, spec.resolution),
            Phase("finetune", objective, typed(FinetuneConfig, {**tcfg, "steps": steps})),
            torch.device("cpu"),
            RunLogger(None),
        )

    fit(WARMUP)
    start = time.perf_counter()
    fit(args.steps)
    return {
        "case": f"finetune-{objective}",
        "batch_size": tcfg["batch_size"],
        "s_per_step": (time.perf_counter() - start) / args.steps,
        "parameters": sum(p.numel() for p in denoiser.net.parameters()),
    }


def sample_case(method: str, args) -> dict:
    dataset, dcfg, ipc = diffusion_config(args.ipc, args.sample_steps)
    spec = dataset_spec(dataset)
    torch.manual_seed(0)
    denoiser = fresh_denoiser(
        typed(PixelDiffusionConfig, dcfg), spec.num_classes, spec.channels, spec.resolution, PixelCodec()
    )
    denoiser.net.eval().requires_grad_(False)
    means = torch.randn(spec.num_classes, *denoiser.latent_shape) * 0.5
    labels = torch.arange(spec.num_classes).repeat_interleave(ipc)
    scfg = typed(SampleConfig, {**dcfg["sample"], "method": method})
    schedule = typed(NoiseScheduleConfig, dcfg["schedule"])

    def run():
        return sample_latents(
            denoiser,
            make_scheduler(schedule, scfg.scheduler),
            labels,
            0,
            scfg,
            torch.device("cpu"),
            CgsReference(means),
        )

    sample_latents(
        denoiser,
        make_scheduler(schedule, scfg.scheduler),
        labels[:2],
        0,
        typed(SampleConfig, {**scfg, "steps": 2}),
        torch.device("cpu"),
        CgsReference(means),
    )  # warm-up
    base = maxrss_mb()
    start = time.perf_counter()
    run()
    return {
        "case": f"sample-{method}",
        "images": len(labels),
        "steps": scfg["steps"],
        "guidance_scale": scfg["guidance_scale"],
        "seconds": time.perf_counter() - start,
        "peak_rss_growth_mb": maxrss_mb() - base,
    }


def run_case(case: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--ipc",
        str(args.ipc),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    if args.sample_steps:
        cmd += ["--sample-steps", str(args.sample_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="timed fine-tuning steps per objective")
    parser.add_argument("--sample-steps", type=int, default=None, help="default: diffusion.sample.steps (50)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a subprocess
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        kind, name = args.case.split("-", 1)
        print(json.dumps(finetune_case(name, args) if kind == "finetune" else sample_case(name, args)))
        return

    print(f"digits, IPC {args.ipc}, {args.threads} thread(s)\n")
    print(f"{'fine-tune objective':<22}{'batch':>7}{'s/step':>10}")
    for objective in OBJECTIVES:
        r = run_case(f"finetune-{objective}", args)
        print(f"{objective:<22}{r['batch_size']:>7}{r['s_per_step']:>10.3f}")
    print(f"(UNet2DModel, {r['parameters'] / 1e6:.2f} M parameters)\n")
    print(f"{'sampling':<22}{'images':>7}{'steps':>7}{'seconds':>10}{'peak RSS +MB':>14}")
    rows = {m: run_case(f"sample-{m}", args) for m in METHODS}
    for m, r in rows.items():
        print(f"{m:<22}{r['images']:>7}{r['steps']:>7}{r['seconds']:>10.2f}{r['peak_rss_growth_mb']:>14.1f}")
    ratio = rows["cgs"]["seconds"] / rows["independent"]["seconds"]
    print(f"CGS / independent time: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
