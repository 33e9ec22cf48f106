"""How far one CGS guidance step moves DiT latents: ||dz_dpp|| / ||z|| per denoising step, for each
DPP kernel (zt, x0_hat) under each diffusion.sample.cgs.step_norm (none, noise_std, cap).

    OMP_NUM_THREADS=2 python scripts/measure_cgs_step.py --every 5   # DiT-XL/2, random weights (~7-20 min)
    python scripts/measure_cgs_step.py --denoiser gaussian            # the analytic reference (seconds)
    python scripts/measure_cgs_step.py --depth 2 --steps 10           # a smoke run (seconds)

The sampler settings are the DiT cell's (experiment=rsm_cgs/imagenette_ipc10, conf/diffusion/dit.yaml):
N = ipc = 10 latents of one class (4x32x32), 50 DDPM steps, classifier-free guidance 4 on 3 of the
4 channels, Table 1's eta_DPP 100 and mu_DM 1000, eps 1e-3, cap at the config's max_step.
The denoiser:
  dit       DiTTransformer2DModel with DiT-XL/2's architecture (28 layers, 16 heads x 72 = 1152
            hidden, patch 2, 1000 classes) and random weights (none can be downloaded here).
  gaussian  the exact denoiser (MMSE x0_hat) of Gaussian class data x0 ~ N(mu, (1 - r) I) with
            mu ~ N(0, r I) (--class-share r): latents of unit variance like the scaled SD-VAE's. Its
            x0_hat is the class mean at high noise and a sample at low noise, as a trained model's is;
            a random DiT's x0_hat is (z - sqrt(1 - abar) eps) / sqrt(abar) for an eps unrelated to z,
            i.e. ~1/sqrt(abar) times too long early, which hides the x0_hat kernel's amplification.
            No classifier-free guidance (the conditional eps is exact).
One trajectory of the plain sampler (ddist.diffusion.sampling: guided_eps, scheduler.step),
without guidance; after each measured step every (kernel, step_norm) variant computes the step it
would take from those latents (ddist.objectives.cgs: raw_steps, size_step), so the whole table costs
one trajectory. The class-mean (DM) step, which no step_norm resizes, is shown beside them with the
random mu as the real class mean. The teacher kernel is left out: it needs a VAE decode and a
classifier, and a random classifier's features say nothing about a trained one's.
--every K measures the steps 0, K, 2K, ... and the last of the 50-step schedule, running the
trajectory only through them and their next timesteps (custom DDPM timesteps): each measured step
is the 50-step sampler's step from t_i to t_{i+1}, reached by a coarser trajectory before it
(DDPM's fixed variance under-disperses coarse steps: the gaussian denoiser's last latents end at a
mean cosine of 0.34 with --every 5 against 0.28 with every step).

Columns: step i of the schedule, its t, abar of the post-step latents z, their rms (||z|| / sqrt(D)),
the mean off-diagonal cosine of each kernel's vectors, then mean over the N latents of
||dz|| / ||z|| in % for each variant and for the DM step.

Measured on this 2-core CPU box (OMP_NUM_THREADS=2), seed 0, eta_dpp 100, mu_dm 1000, max_step 0.05.

`--denoiser gaussian` (class-mean share 0.25; every step measured, every 5th shown; 31 s):

    | step | t | abar | rms z | cos zt | cos x0 | zt none | zt nstd | zt cap | x0 none | x0 nstd | x0 cap | dm |
    |---|---|---|---|---|---|---|---|---|---|---|---|---|
    | 0 | 980 | 0.0001 | 1.0 | -0.00 | 1.00 | 0.2 | 0.2 | 0.2 | 1e4 | 1e4 | 5 | 1.5 |
    | 5 | 880 | 0.0006 | 1.0 | 0.00 | 1.00 | 0.22 | 0.22 | 0.22 | 6.3e3 | 6.3e3 | 5 | 1.6 |
    | 10 | 780 | 0.0028 | 1.0 | 0.00 | 1.00 | 0.23 | 0.23 | 0.23 | 2.1e3 | 2.1e3 | 5 | 1.5 |
    | 15 | 680 | 0.0119 | 1.0 | 0.01 | 0.98 | 0.22 | 0.22 | 0.22 | 5.6e2 | 5.6e2 | 5 | 1.6 |
    | 20 | 580 | 0.0409 | 1.0 | 0.01 | 0.93 | 0.24 | 0.24 | 0.24 | 1.6e2 | 1.6e2 | 5 | 1.6 |
    | 25 | 480 | 0.1148 | 1.0 | 0.03 | 0.82 | 0.48 | 0.45 | 0.48 | 53 | 50 | 5 | 1.5 |
    | 30 | 380 | 0.2635 | 1.0 | 0.06 | 0.65 | 0.84 | 0.72 | 0.84 | 20 | 17 | 5 | 1.5 |
    | 35 | 280 | 0.4950 | 1.0 | 0.12 | 0.48 | 1.4 | 1 | 1.4 | 8.6 | 6.1 | 5 | 1.4 |
    | 40 | 180 | 0.7611 | 1.0 | 0.20 | 0.35 | 2.1 | 1 | 2.1 | 4.5 | 2.2 | 4.5 | 1.4 |
    | 45 | 80 | 0.9583 | 0.9 | 0.26 | 0.29 | 2.7 | 0.56 | 2.7 | 3.1 | 0.64 | 3.1 | 1.3 |
    | 49 | 0 | 1.0000 | 0.9 | 0.28 | 0.28 | 3 | 0 | 3 | 3 | 0 | 3 | 1.3 |

    | variant | min % | max % | steps < 0.1% | steps > 10.0% |
    |---|---|---|---|---|
    | zt none | 0.194 | 2.97 | 0/50 | 0/50 |
    | zt noise_std | 0 | 1.08 | 2/50 | 0/50 |
    | zt cap | 0.194 | 2.97 | 0/50 | 0/50 |
    | x0_hat none | 2.97 | 1.02e4 | 0/50 | 35/50 |
    | x0_hat noise_std | 0 | 1.02e4 | 2/50 | 33/50 |
    | x0_hat cap | 2.97 | 5 | 0/50 | 0/50 |

`--every 5`, DiT-XL/2 (diffusers DiTTransformer2DModel, 28 layers, 1152 hidden, 750M parameters),
random weights, CFG 4 on 3 channels: 21 forwards of 20 latents, 1275 s (one forward takes 18-21 s
on the idle box, ~60 s here with other jobs running). Its own trajectory diverges (rms z 1.5 -> 320:
a random eps is unrelated to z), so from step 10 on every variant is < 0.1% because ||z|| grew, not
because the gradient vanished; only step 0 (rms z 1.5) speaks to the guidance, and there the random
net's x0_hat do not collapse as a trained model's do (cos 0.60, not 1.000), so it cannot show the
x0_hat kernel's 1/sqrt(abar) amplification. The gaussian table is the one that chose the DiT default
(conf/diffusion/dit.yaml: x0_hat, cap 0.05, every step).

    | step | t | abar | rms z | cos zt | cos x0 | zt none | zt nstd | zt cap | x0 none | x0 nstd | x0 cap | dm |
    |---|---|---|---|---|---|---|---|---|---|---|---|---|
    | 0 | 980 | 0.0001 | 1.5 | 0.17 | 0.60 | 0.74 | 0.74 | 0.74 | 1.4 | 1.4 | 1.4 | 2.5 |
    | 5 | 880 | 0.0006 | 6.2 | 0.48 | 0.53 | 0.11 | 0.11 | 0.11 | 0.11 | 0.11 | 0.11 | 3.5 |
    | 10 | 780 | 0.0028 | 15.7 | 0.52 | 0.53 | 0.019 | 0.019 | 0.019 | 0.018 | 0.018 | 0.018 | 3.7 |
    | 15 | 680 | 0.0119 | 33.6 | 0.53 | 0.54 | 0.0042 | 0.0042 | 0.0042 | 0.0042 | 0.0041 | 0.0042 | 3.7 |
    | 20 | 580 | 0.0409 | 63.4 | 0.54 | 0.54 | 0.0012 | 0.0012 | 0.0012 | 0.0012 | 0.0012 | 0.0012 | 3.7 |
    | 25 | 480 | 0.1148 | 107.1 | 0.54 | 0.54 | 0.00042 | 0.0004 | 0.00042 | 0.00042 | 0.00039 | 0.00042 | 3.7 |
    | 30 | 380 | 0.2635 | 163.0 | 0.54 | 0.54 | 0.00018 | 0.00016 | 0.00018 | 0.00018 | 0.00016 | 0.00018 | 3.7 |
    | 35 | 280 | 0.4950 | 224.0 | 0.54 | 0.54 | 9.6e-5 | 6.8e-5 | 9.6e-5 | 9.6e-5 | 6.8e-5 | 9.6e-5 | 3.7 |
    | 40 | 180 | 0.7611 | 278.3 | 0.54 | 0.54 | 6.2e-5 | 3e-5 | 6.2e-5 | 6.2e-5 | 3e-5 | 6.2e-5 | 3.7 |
    | 45 | 80 | 0.9583 | 312.7 | 0.54 | 0.54 | 4.9e-5 | 1e-5 | 4.9e-5 | 4.9e-5 | 1e-5 | 4.9e-5 | 3.7 |
    | 49 | 0 | 1.0000 | 319.6 | 0.54 | 0.54 | 4.7e-5 | 0 | 4.7e-5 | 4.7e-5 | 0 | 4.7e-5 | 3.7 |

    | variant | min % | max % | steps < 0.1% | steps > 10.0% |
    |---|---|---|---|---|
    | zt none | 4.74e-5 | 0.74 | 9/11 | 0/11 |
    | zt noise_std | 0 | 0.74 | 9/11 | 0/11 |
    | zt cap | 4.74e-5 | 0.74 | 9/11 | 0/11 |
    | x0_hat none | 4.74e-5 | 1.42 | 9/11 | 0/11 |
    | x0_hat noise_std | 0 | 1.42 | 9/11 | 0/11 |
    | x0_hat cap | 4.74e-5 | 1.42 | 9/11 | 0/11 |
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.config.compat import typed
from ddist.config.schema import DiffusionModelConfig, LatentModelConfig, NoiseScheduleConfig
from ddist.diffusion.sampling import abar_after, guided_eps, kernel_embedding, make_scheduler
from ddist.models.diffusion import build_dit, latent_denoiser
from ddist.objectives.cgs import CgsTerms, cosine_kernel, raw_steps, size_step

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("zt", "x0_hat")
NORMS = ("none", "noise_std", "cap")
CELL = "rsm_cgs/imagenette_ipc10"
# eps(z, t) of one class: latents [N, C, h, w] and a timestep -> the eps the sampler steps with
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cell_config() -> tuple[dict, int]:
    """diffusion (resolved) and ipc of the DiT cell."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={CELL}", "paths.root_dir=.", "paths.output_dir=."])
    return OmegaConf.to_container(cfg.diffusion, resolve=True, enum_to_str=True), int(cfg.ipc)


def dit_eps(dcfg: dict, depth: int | None, class_id: int, n: int) -> EpsFn:
    """guided_eps of a random-weight DiT of the config's architecture (depth: fewer layers), class `class_id`."""
    model_cfg = {**dcfg["model"], "dit": {**dcfg["model"]["dit"], **({"num_layers": depth} if depth else {})}}
    torch.manual_seed(0)
    net = build_dit(typed(LatentModelConfig, model_cfg), 1000, 4, 32).eval().requires_grad_(False)
    denoiser = latent_denoiser(net, typed(DiffusionModelConfig, {"class_ids": None}), 1000)
    ids = torch.full((n,), class_id)
    s = dcfg["sample"]
    return lambda z, t: guided_eps(denoiser, z, t, ids, s["guidance_scale"], s["batch_size"], s["guidance_channels"])


def gaussian_eps(mu: torch.Tensor, share: float, alphas_cumprod: torch.Tensor) -> EpsFn:
    """The exact eps of data x0 ~ N(mu, (1 - share) I): x0_hat = mu + a s2 / (a^2 s2 + 1 - abar) (z - a mu)."""
    s2 = 1.0 - share

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = float(alphas_cumprod[t])
        a = abar**0.5
        x0_hat = mu + a * s2 / (abar * s2 + 1 - abar) * (z - a * mu)
        return (z - a * x0_hat) / (1 - abar) ** 0.5

    return eps


def measured_steps(steps: int, every: int) -> list[int]:
    return sorted({*range(0, steps, every), steps - 1})


def trajectory_timesteps(schedule: torch.Tensor, measured: list[int]) -> list[int]:
    """The timesteps of a trajectory that takes each measured step i of `schedule` (t_i -> t_i+1) as it is."""
    keep = {i for m in measured for i in (m, m + 1) if i < len(schedule)}
    return [int(schedule[i]) for i in sorted(keep)]


def step_table(
    eps_fn: EpsFn, scheduler, z: torch.Tensor, cgs: dict, mu: torch.Tensor, steps: int, every: int, log=None
) -> list[dict]:
    """One plain trajectory from z [N, C, h, w]; at each measured step, what each variant would do
    (log(row), if given, as each is measured)."""
    scheduler.set_timesteps(steps)
    schedule = scheduler.timesteps.clone()
    measured = measured_steps(steps, every)
    if every > 1:
        scheduler.set_timesteps(timesteps=trajectory_timesteps(schedule, measured))
    index = {int(t): i for i, t in enumerate(schedule)}  # timestep -> its step in the schedule
    gen = torch.Generator().manual_seed(1)
    rows = []
    for k, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            out = scheduler.step(eps_fn(z, t), t, z, generator=gen)
        i = index[int(t)]
        if i in measured:
            z_next, abar = out.prev_sample, abar_after(scheduler, k)
            z_norm = z_next.flatten(1).norm(dim=1)
            row = {"i": i, "t": int(t), "abar": abar, "rms": float(z_norm.mean() / z_next[0].numel() ** 0.5)}
            for kernel in KERNELS:
                embed = kernel_embedding(kernel, out.pred_original_sample, abar, None)
                vectors = z_next if embed is None else out.pred_original_sample
                cos = cosine_kernel(vectors)
                row[f"cos {kernel}"] = float((cos.sum() - cos.diagonal().sum()) / (len(cos) ** 2 - len(cos)))
                dpp, dm = raw_steps(z_next, CgsTerms(cgs["eta_dpp"], cgs["mu_dm"], mu, abar, cgs["eps"], embed))
                for norm in NORMS:
                    dz = size_step(dpp, z_next, norm, abar, cgs["max_step"])
                    row[f"{kernel} {norm}"] = float((dz.flatten(1).norm(dim=1) / z_norm).mean() * 100)
            row["dm"] = float((dm.flatten(1).norm(dim=1) / z_norm).mean() * 100)
            rows.append(row)
            if log is not None:
                log(row)
        z = out.prev_sample
    return rows


VARIANTS = [f"{k} {n}" for k in KERNELS for n in NORMS]


def pct(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}g}".replace("e-0", "e-").replace("e+0", "e")


def markdown(rows: list[dict]) -> str:
    """The per-step table; variant columns in % of ||z|| (x0 = x0_hat, nstd = noise_std)."""
    short = [v.replace("x0_hat", "x0").replace("noise_std", "nstd") for v in VARIANTS]
    head = ["step", "t", "abar", "rms z", "cos zt", "cos x0", *short, "dm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["i"]), str(r["t"]), f"{r['abar']:.4f}", f"{r['rms']:.1f}"]
        cells += [f"{r['cos zt']:.2f}", f"{r['cos x0_hat']:.2f}"]
        cells += [pct(r[v]) for v in [*VARIANTS, "dm"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], vanish: float = 0.1, overshoot: float = 10.0) -> str:
    """Per variant: the range of the step over the measured steps and how many vanish / overshoot."""
    lines = [f"| variant | min % | max % | steps < {vanish}% | steps > {overshoot}% |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        values = [r[v] for r in rows]
        low, high = sum(x < vanish for x in values), sum(x > overshoot for x in values)
        lines.append(
            f"| {v} | {pct(min(values), 3)} | {pct(max(values), 3)} | {low}/{len(values)} | {high}/{len(values)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", choices=["dit", "gaussian"], default="dit")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the cell's, 50)")
    parser.add_argument("--every", type=int, default=1, help="measure every K-th step (and the last)")
    parser.add_argument("--n", type=int, default=None, help="latents of the class (default: the cell's ipc, 10)")
    parser.add_argument("--depth", type=int, default=None, help="DiT layers (default: DiT-XL/2's 28)")
    parser.add_argument("--max-step", type=float, default=None, help="cap's max_step (default: the config's)")
    parser.add_argument("--class-share", type=float, default=0.25, help="gaussian: the class mean's share of var")
    parser.add_argument("--class-id", type=int, default=0, help="dit: the ImageNet class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dcfg, ipc = cell_config()
    s = dcfg["sample"]
    n, steps = args.n or ipc, args.steps or s["steps"]
    cgs = {**s["cgs"], **({"max_step": args.max_step} if args.max_step else {})}
    scheduler = make_scheduler(typed(NoiseScheduleConfig, dcfg["schedule"]), s["scheduler"])
    gen = torch.Generator().manual_seed(args.seed)
    mu = torch.randn(4, 32, 32, generator=gen) * args.class_share**0.5
    z = torch.randn(n, 4, 32, 32, generator=gen)
    if args.denoiser == "dit":
        eps_fn = dit_eps(dcfg, args.depth, args.class_id, n)
        what = (
            f"random-weight DiT ({args.depth or dcfg['model']['dit']['num_layers']} layers), CFG {s['guidance_scale']}"
        )
    else:
        eps_fn, what = gaussian_eps(mu, args.class_share, scheduler.alphas_cumprod), f"gaussian r={args.class_share}"
    print(
        f"{what}; N = {n}, {steps} {s['scheduler']} steps (every {args.every}), eta_dpp {cgs['eta_dpp']:g}, "
        f"mu_dm {cgs['mu_dm']:g}, eps {cgs['eps']:g}, cap max_step {cgs['max_step']:g}; "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    start = time.perf_counter()
    rows = step_table(
        eps_fn,
        scheduler,
        z,
        cgs,
        mu,
        steps,
        args.every,
        log=lambda r: print(f"step {r['i']} done after {time.perf_counter() - start:.0f} s", flush=True),
    )
    print(f"\n{markdown(rows)}\n\n{summary(rows)}\n\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
