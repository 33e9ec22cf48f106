"""Diffusion stage pieces on tiny random models: sampling modes, parameter subsets, the training loop,
the latent path, and the error for a missing pretrained model offline."""

import itertools
import math

import pytest
import torch
from conftest import run_pipeline
from diffusers import UNet2DModel
from omegaconf import OmegaConf

from ddist.config.compat import typed
from ddist.config.schema import (
    DiffusionModelConfig,
    DiffusionTrainConfig,
    FinetuneConfig,
    NoiseScheduleConfig,
    PixelModelConfig,
    SampleConfig,
)
from ddist.data import dataset_spec, load_split
from ddist.diffusion.sampling import (
    CgsReference,
    cgs_guidance,
    denoise,
    guided_eps,
    image_generators,
    make_scheduler,
    sample_latents,
    teacher_features,
)
from ddist.errors import ConfigError
from ddist.logging import RunLogger
from ddist.models import build_model
from ddist.models.diffusion import PixelCodec, class_id_map, pixel_denoiser
from ddist.objectives.diffusion import predict_x0
from ddist.runtime.artifacts import load_distilled
from ddist.training.denoiser import (
    Phase,
    TrainData,
    is_difffit,
    select_parameters,
    train_denoiser,
)

DIGITS = {
    "name": "digits",
    "format": "digits",
    "root": None,
    "num_classes": 10,
    "classes": [str(i) for i in range(10)],
    "wnids": None,
    "channels": 1,
    "resolution": 16,
    "mean": [0.3054],
    "std": [0.3186],
    "in_memory": True,
}
SCHEDULE = typed(
    NoiseScheduleConfig, {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
)


def tiny_denoiser(num_classes=10, seed=0):
    torch.manual_seed(seed)
    net = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        num_class_embeds=num_classes + 1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return pixel_denoiser(net.eval(), model_ids(None), num_classes)


def model_ids(class_ids):
    """diffusion.model with only its class_ids set."""
    return typed(DiffusionModelConfig, {"class_ids": class_ids})


def sample_cfg(method, guidance_channels=None, **cgs):
    return typed(
        SampleConfig,
        {
            "method": method,
            "scheduler": "ddpm",
            "steps": 4,
            "guidance_scale": 2.0,
            "guidance_channels": guidance_channels,
            "ddim_eta": 0.0,
            "batch_size": 4,
            "cgs": {
                "eta_dpp": 0.0,
                "mu_dm": 0.0,
                "eps": 1e-3,
                "kernel": "zt",
                "step_norm": "none",
                "max_step": 0.05,
                "start": 0.0,
                "end": 1.0,
                **cgs,
            },
        },
    )


def tiny_teacher_features():
    """teacher_features of a random ConvNet on 8 px, 1-channel images (the tiny denoiser's space)."""
    spec = dataset_spec({**DIGITS, "resolution": 8})
    torch.manual_seed(1)
    teacher = build_model({"name": "convnet", "depth": 2, "width": 8}, 10, 1, 8).eval().requires_grad_(False)
    return teacher_features(teacher, PixelCodec(), spec)


@pytest.mark.parametrize("scheduler,kernel", [("ddpm", "zt"), ("ddim", "zt"), ("ddpm", "x0_hat"), ("ddim", "teacher")])
def test_cgs_without_guidance_reproduces_independent_sampling(scheduler, kernel):
    denoiser = tiny_denoiser()
    labels = torch.arange(3).repeat_interleave(3)  # batches of 4 mix classes in independent mode
    means = torch.zeros(10, 1, 8, 8)

    def run(cfg):
        return sample_latents(
            denoiser,
            make_scheduler(SCHEDULE, scheduler),
            labels,
            7,
            cfg,
            torch.device("cpu"),
            CgsReference(means, tiny_teacher_features()),
        )

    independent = run(sample_cfg("independent"))
    cgs = run(sample_cfg("cgs", kernel=kernel))
    torch.testing.assert_close(cgs, independent, rtol=1e-4, atol=1e-4)  # batch composition only
    dpp = run(sample_cfg("cgs", kernel=kernel, eta_dpp=0.1))
    assert (dpp - independent).abs().max() > 1e-3  # the DPP gradient reaches the latents through the kernel
    guided = run(sample_cfg("cgs", kernel=kernel, eta_dpp=0.1, mu_dm=5.0))
    assert (guided - dpp).abs().max() > 1e-3  # and so does the distribution matching
    other_seed = sample_latents(
        denoiser, make_scheduler(SCHEDULE, scheduler), labels, 8, sample_cfg("independent"), torch.device("cpu")
    )
    assert (other_seed - independent).abs().max() > 1e-1


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_guidance_sees_the_current_steps_exact_clean_estimate(scheduler):
    denoiser, sched = tiny_denoiser(), make_scheduler(SCHEDULE, scheduler)
    sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    z, ids = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2])
    seen = []
    denoise(
        denoiser,
        sched,
        z,
        ids,
        image_generators(0, [0, 1, 2]),
        sample_cfg("cgs"),
        guide=lambda i, z_next, x0_hat: seen.append((z_next, x0_hat)) or z_next,
    )
    t = sched.timesteps[0]
    eps = guided_eps(denoiser, z, t, ids, 2.0, 4)
    torch.testing.assert_close(seen[0][1], predict_x0(z, eps, sched.alphas_cumprod[t]))  # at the step's own t
    next_formula = predict_x0(seen[0][0], eps, sched.alphas_cumprod[sched.timesteps[1]])
    # the next step's alpha recovers x0_hat after a DDIM (eta 0) step, not after DDPM's posterior step
    assert torch.allclose(next_formula, seen[0][1], atol=1e-4) == (scheduler == "ddim")


@pytest.mark.parametrize("start,end,guided", [(0.0, 1.0, [0, 1, 2, 3]), (0.25, 0.75, [1, 2]), (0.5, 1.0, [2, 3])])
def test_cgs_guides_exactly_the_steps_inside_its_window(start, end, guided):
    denoiser, sched = tiny_denoiser(), make_scheduler(SCHEDULE, "ddpm")
    sched.set_timesteps(4)
    z, ids = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(3, dtype=torch.long)
    cfg = sample_cfg("cgs", eta_dpp=0.1, start=start, end=end)
    guide = cgs_guidance(cfg["cgs"], sched, [(torch.arange(3), torch.zeros(1, 8, 8))])
    moved = []

    def watch(i, z_next, x0_hat):
        out = guide(i, z_next, x0_hat)
        if not torch.equal(out, z_next):
            moved.append(i)
        return out

    denoise(denoiser, sched, z, ids, image_generators(0, [0, 0, 0]), cfg, guide=watch)
    assert moved == guided  # step i is guided when start <= i / 4 < end


def test_guidance_channels_guide_only_the_first_channels():
    class Fake:  # eps_theta(z, t, y) = y + 10 * channel index: conditional and null ids give different eps
        null_id = 9

        def eps(self, z, t, ids):
            return ids.float().view(-1, 1, 1, 1) + 10 * torch.arange(z.shape[1]).float().view(1, -1, 1, 1) + 0 * z

    z, ids, scale = torch.zeros(2, 4, 2, 2), torch.tensor([1, 3]), 4.0
    out = guided_eps(Fake(), z, torch.tensor(5), ids, scale, batch_size=3, channels=3)
    cond = Fake().eps(z, None, ids)
    uncond = Fake().eps(z, None, torch.full_like(ids, 9))
    guided = uncond + scale * (cond - uncond)
    torch.testing.assert_close(out[:, :3], guided[:, :3])
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # the last channel keeps the conditional eps
    torch.testing.assert_close(guided_eps(Fake(), z, torch.tensor(5), ids, scale, 3, channels=None), guided)


@pytest.mark.parametrize(
    "cfg,option",
    [
        (sample_cfg("cgs", kernel="teacher"), "diffusion.sample.cgs.kernel=teacher"),  # no teacher given
        (sample_cfg("independent", guidance_channels=2), "diffusion.sample.guidance_channels"),  # 1-channel model
    ],
)
def test_sampling_options_that_cannot_run_are_config_errors(cfg, option):
    with pytest.raises(ConfigError, match=option):
        sample_latents(
            tiny_denoiser(),
            make_scheduler(SCHEDULE, "ddpm"),
            torch.arange(2),
            0,
            cfg,
            torch.device("cpu"),
            CgsReference(torch.zeros(10, 1, 8, 8)),
        )


def test_each_image_draws_its_own_noise_whatever_the_order():
    a = image_generators(0, [0, 0, 1])
    b = image_generators(0, [1, 0, 0])  # the same images (class, index), listed differently

    def draw(g):
        return torch.randn(3, generator=g)

    assert torch.equal(draw(a[2]), draw(b[0]))
    assert torch.equal(draw(a[0]), draw(b[1]))
    assert not torch.equal(draw(image_generators(1, [0])[0]), draw(image_generators(0, [0])[0]))


def test_the_unets_difffit_subset_is_biases_norms_and_embeddings():
    # the DiT's subset is MiniMax's: tests/test_diffusion_finetune.py
    assert is_difffit("down_blocks.0.resnets.0.conv1.bias")
    assert is_difffit("down_blocks.0.resnets.0.norm1.weight")
    assert is_difffit("time_embedding.linear_1.weight")
    assert is_difffit("class_embedding.weight")
    assert not is_difffit("down_blocks.0.resnets.0.conv1.weight")
    net = tiny_denoiser().net
    chosen, _ = select_parameters(net, "difffit")
    assert 0 < sum(p.numel() for p in chosen) < sum(p.numel() for p in net.parameters())
    assert net.class_embedding.weight.requires_grad and not net.conv_in.weight.requires_grad


def test_class_ids_map_labels_to_the_models_classes():
    assert class_id_map(model_ids([0, 217]), 2, 1000).tolist() == [0, 217]
    assert class_id_map(model_ids(None), 3, 3).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="diffusion.model.class_ids"):
        class_id_map(model_ids(None), 10, 1000)
    with pytest.raises(ConfigError, match="diffusion.model.class_ids"):
        class_id_map(model_ids([0, 1000]), 2, 1000)


@pytest.mark.parametrize("objective,params", [("minimax", "all"), ("rsm", "difffit")])
def test_fine_tuning_runs_each_objective_and_trains_only_the_chosen_parameters(objective, params):
    spec = dataset_spec(DIGITS)
    ds = load_split(DIGITS, "train")
    denoiser = tiny_denoiser()
    net = denoiser.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tcfg = {
        "steps": 3,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "params": params,
        "label_dropout": 0.1,
        "seed": 0,
        "ema": None,
        "ema_schedule": "warmup",
        "checkpoint_every": 100,
        "rsm": {"lambda": 3e-3, "reduction": "sum"},
        "minimax": {"lambda_pos": 0.002, "lambda_neg": 0.008, "memory": 4},
    }
    losses = train_denoiser(
        denoiser,
        PixelCodec(),
        make_scheduler(SCHEDULE, "ddpm"),
        TrainData(ds, spec, 16),
        Phase("finetune", objective, typed(FinetuneConfig, tcfg)),
        torch.device("cpu"),
        RunLogger(None),
    )
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert "class_embedding.weight" in changed
    assert ("conv_in.weight" in changed) == (params == "all")


@pytest.mark.parametrize(
    "overrides,option",
    [
        (
            ["dataset=digits", "diffusion=tiny_dit", "diffusion.model.pretrained=facebook/DiT-XL-2-256"],
            "diffusion.model.pretrained",
        ),
        (["dataset=cifar10", "diffusion=dit"], "diffusion.model.vae_decode"),
    ],
)
def test_a_missing_pretrained_model_offline_is_a_config_error_naming_the_option(
    tmp_path, cache_dir, monkeypatch, overrides, option
):
    """As with HF_HUB_OFFLINE=1 (read once, when huggingface_hub is imported; its calls look it up here)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=f"{option}=/local/"):
        run_pipeline(
            "ipc=1",
            "pipeline=diffusion",
            "pipeline.stages=[diffusion]",
            f"paths.root_dir={tmp_path}",
            *overrides,
            run_dir=tmp_path,
            cache_dir=cache_dir,
        )


def test_the_latent_path_samples_a_distilled_set_with_a_tiny_dit(tmp_path, cache_dir):
    results = run_pipeline(
        "ipc=1",
        "pipeline=diffusion",
        "pipeline.stages=[diffusion]",
        "diffusion=tiny_dit",
        "diffusion.train.steps=2",
        "diffusion.sample.steps=2",
        "diffusion.sample.method=cgs",
        "diffusion.finetune.objective=rsm",
        "diffusion.finetune.steps=1",
        run_dir=tmp_path / "run",
        cache_dir=cache_dir,
    )
    distilled = load_distilled(tmp_path / "run" / "distilled")
    assert distilled.images.shape == (10, 1, 16, 16) and distilled.labels.tolist() == list(range(10))
    # the method is named once, by what made the set (RSM fine-tuning, CGS sampling), not by the pipeline
    assert distilled.meta["method"] == results["method"] == "rsm_cgs"


def test_a_unet_config_diffusers_rejects_is_a_config_error():
    from ddist.models.diffusion import build_unet

    unet = {
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }
    with pytest.raises(ConfigError, match="diffusion.model.unet"):
        build_unet(typed(PixelModelConfig, {"unet": unet}), num_classes=10, channels=1, resolution=16)


def trained_tiny_denoiser(steps: int, ema: float | None):
    """tiny_denoiser() after `steps` plain training steps (seeded: the same trajectory every call)."""
    denoiser = tiny_denoiser()
    tcfg = {
        "steps": steps,
        "batch_size": 8,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "params": "all",
        "label_dropout": 0.1,
        "seed": 0,
        "ema": ema,
        "ema_schedule": "warmup",
        "checkpoint_every": 100,
    }
    spec = dataset_spec(DIGITS)
    sched = make_scheduler(SCHEDULE, "ddpm")
    cpu = torch.device("cpu")
    train_denoiser(
        denoiser,
        PixelCodec(),
        sched,
        TrainData(load_split(DIGITS, "train"), spec, 16),
        Phase("train", "plain", typed(FinetuneConfig, tcfg)),  # as train's node, with params
        cpu,
        RunLogger(None),
    )
    return denoiser


def test_ema_weights_are_the_hand_computed_average_of_the_steps_and_get_saved(tmp_path):
    raw1 = dict(trained_tiny_denoiser(1, None).net.named_parameters())
    raw2 = dict(trained_tiny_denoiser(2, None).net.named_parameters())
    averaged = trained_tiny_denoiser(2, 0.9).net
    # EMAModel: step 1 copies the weights; step 2 decays with min(0.9, 2 / 11)
    d2 = min(0.9, 2 / 11)
    for name, p in averaged.named_parameters():
        torch.testing.assert_close(p, d2 * raw1[name] + (1 - d2) * raw2[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged.conv_in.weight, raw2["conv_in.weight"])
    # what the stage caches (save_pretrained after training) is the average
    averaged.save_pretrained(tmp_path / "saved")
    saved = UNet2DModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(saved.conv_in.weight, averaged.conv_in.weight)


def test_an_ema_decay_outside_0_1_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match=r"diffusion.train.ema=1.0"):
        trained_tiny_denoiser(1, 1.0)


def test_a_training_key_holds_every_field_but_the_declared_ones():
    from ddist.diffusion.keys import training_key

    node = {"lr": 1e-3, "ema": None, "ema_schedule": "warmup", "checkpoint_every": 50}
    assert training_key(node) == {"lr": 1e-3, "ema": None, "ema_schedule": "warmup"}  # unset and default too


def test_the_denoisers_new_options_stay_out_of_the_key_at_their_defaults():
    from ddist.diffusion.keys import training_key

    node = {"lr": 1e-3, "clip_grad_norm": None, "schedule": "constant", "warmup_steps": 0, "log_every": 10}
    assert training_key(node) == {"lr": 1e-3}  # models cached before the options keep their keys
    changed = {"lr": 1e-3, "clip_grad_norm": 1.0, "schedule": "cosine", "warmup_steps": 5, "log_every": 10}
    assert training_key(changed) == {"lr": 1e-3, "clip_grad_norm": 1.0, "schedule": "cosine", "warmup_steps": 5}


def test_the_denoiser_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    from ddist.training.denoiser import denoiser_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    assert denoiser_schedule(opt, typed(DiffusionTrainConfig, {"schedule": "constant"}), 10) is None  # as before
    sched = denoiser_schedule(opt, typed(DiffusionTrainConfig, {"schedule": "cosine", "warmup_steps": 2}), 10)
    assert sched is not None
    lrs = [sched.get_last_lr()[0]]
    for _ in range(9):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_the_denoiser_clips_its_gradients_when_asked(monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n: norms.append(n) or clip(p, n))
    denoiser = tiny_denoiser()
    tcfg = {
        "steps": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "label_dropout": 0.1,
        "seed": 0,
        "ema": None,
        "ema_schedule": "warmup",
        "checkpoint_every": 100,
        "clip_grad_norm": 0.5,
        "schedule": "cosine",
    }
    data = TrainData(load_split(DIGITS, "train"), dataset_spec(DIGITS), 16)
    sched = make_scheduler(SCHEDULE, "ddpm")
    losses = train_denoiser(
        denoiser,
        PixelCodec(),
        sched,
        data,
        Phase("train", "plain", typed(DiffusionTrainConfig, tcfg)),
        torch.device("cpu"),
        RunLogger(None),
    )
    assert norms == [0.5, 0.5] and len(losses) == 2


def test_an_unknown_backbone_is_a_config_error_listing_the_registered_ones():
    from ddist.models.diffusion import BACKBONES, make_codec

    assert set(BACKBONES) == {"pixel", "latent"}
    with pytest.raises(ConfigError, match="diffusion.backbone 'vit'.*pixel, latent"):
        make_codec(OmegaConf.create({"backbone": "vit", "model": {}}), 1, need_encoder=False)  # past the schema


def test_measure_cgs_step_tabulates_each_variant_on_a_tiny_dit():
    """scripts/measure_cgs_step.py's core on a 2-layer, 16-wide DiT, 4 steps measured at 0, 2 and the last."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("measure_cgs_step", REPO / "scripts" / "measure_cgs_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    dit = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "patch_size": 2}
    dcfg = {"model": {"dit": {**dit, "num_embeds_ada_norm": 1000}}, "sample": sample_cfg("cgs", guidance_channels=3)}
    cgs = {**dcfg["sample"]["cgs"], "eta_dpp": 100.0, "mu_dm": 1000.0, "max_step": 0.01}
    z, mu = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 32, 32)
    rows = script.step_table(script.dit_eps(dcfg, None, 5, 3), make_scheduler(SCHEDULE, "ddpm"), z, cgs, mu, 4, 2)
    assert [r["i"] for r in rows] == [0, 2, 3] and [r["t"] for r in rows] == [750, 250, 0]  # the 4-step schedule's
    for r in rows:
        for kernel in script.KERNELS:
            assert r[f"{kernel} cap"] <= min(r[f"{kernel} none"], 1.0) * (1 + 1e-5)  # max_step 1%
            assert r[f"{kernel} noise_std"] == pytest.approx((1 - r["abar"]) ** 0.5 * r[f"{kernel} none"], rel=1e-5)
    assert rows[-1]["abar"] == 1.0 and rows[-1]["zt noise_std"] == 0.0  # the last step leaves clean latents
    assert "| zt none |" in script.markdown(rows) and "| x0_hat cap |" in script.summary(rows)


def test_sampling_reports_progress_per_group_and_step(monkeypatch):
    """Each group's denoising steps are reported to ddist.logging.progress as "sample group g/G"."""
    from ddist.diffusion import sampling
    from ddist.logging import progress

    seen = []

    def recording(iterable=None, desc="", total=None, **kwargs):
        seen.append((desc, total))
        return progress(iterable, desc=desc, total=total, **kwargs)

    monkeypatch.setattr(sampling, "progress", recording)
    labels = torch.arange(2).repeat_interleave(3)  # 6 images in batches of 4: 2 groups
    cfg = sample_cfg("independent")
    sample_latents(tiny_denoiser(), make_scheduler(SCHEDULE, "ddim"), labels, 0, cfg, torch.device("cpu"))
    assert seen == [("sample group 1/2", cfg["steps"]), ("sample group 2/2", cfg["steps"])]
