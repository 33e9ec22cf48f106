"""The diffusion experiment files hold the papers' values, and every diffusion pipeline runs end to end."""

import json
from pathlib import Path

import pytest
from conftest import run_pipeline
from hydra import compose, initialize_config_dir

from ddist.models import student_config

CONF = Path(__file__).resolve().parents[1] / "conf"
PIPELINES = ["diffusion", "minimax", "rsm", "cgs", "rsm_cgs"]
# pipeline -> (fine-tuning objective, sampling method)
RECIPES = {
    "diffusion": ("none", "independent"),
    "minimax": ("minimax", "independent"),
    "rsm": ("rsm", "independent"),
    "cgs": ("none", "cgs"),
    "rsm_cgs": ("rsm", "cgs"),
}
# the seed's Table 1: (dataset, ipc) -> (lambda, lr, eta_DPP, mu_DM)
TABLE1 = {
    ("imagenette", 10): (3e-3, 1e-3, 100, 1000),
    ("imagenette", 50): (5e-3, 1e-3, 100, 10000),
    ("imagenette", 100): (5e-3, 1e-3, 100, 3000),
    ("imagewoof", 10): (1e-2, 1e-3, 300, 3000),
    ("imagewoof", 50): (1e-2, 1e-3, 100, 1000),
    ("imagewoof", 100): (1e-2, 1e-3, 100, 1000),
}
SMALL_CELLS = ["digits_ipc10", "digits_ipc50", "cifar10_ipc10"]


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def test_every_diffusion_experiment_file_is_covered():
    imagenet = [f"{d}_ipc{i}" for d, i in TABLE1]
    for method in PIPELINES:
        expected = SMALL_CELLS + (imagenet if method in ("minimax", "rsm_cgs") else [])
        assert sorted(p.stem for p in (CONF / "experiment" / method).glob("*.yaml")) == sorted(expected)


def check_imagenet_common(cfg, dataset: str, ipc: int) -> None:
    assert (cfg.dataset.name, cfg.ipc) == (dataset, ipc)
    assert cfg.dataset.resolution == 224
    d = cfg.diffusion
    assert (d.backbone, d.model.pretrained, d.model.subfolder) == ("latent", "facebook/DiT-XL-2-256", "transformer")
    assert (d.model.vae, d.model.vae_decode) == ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
    assert list(d.model.class_ids) == list(cfg.dataset.imagenet_ids)
    assert (d.sample.steps, d.sample.guidance_scale, d.sample.scheduler) == (50, 4.0, "ddpm")
    assert (d.finetune.params, d.finetune.batch_size, d.finetune.epochs, d.finetune.steps) == ("difffit", 8, 8, None)
    assert (d.finetune.ema, d.finetune.ema_schedule, d.finetune.label_dropout) == (0.9999, "fixed", 0.1)  # MiniMax's
    assert cfg.evaluate.protocol == "hard"
    # MiniMax's students: ConvNet-6 (instance norm), ResNetAP-10 and ResNet-18, by conf/model preset
    students = [student_config(s) for s in cfg.evaluate.students]
    assert [(name, model["name"]) for name, model in students] == [
        ("convnet6", "convnet"),
        ("resnet_ap10", "resnet_ap10"),
        ("resnet18", "resnet18"),
    ]
    assert (students[0][1]["depth"], students[0][1]["norm"]) == (6, "instance")


@pytest.mark.parametrize("dataset,ipc", list(TABLE1))
def test_rsm_cgs_experiments_hold_table_1(dataset, ipc):
    cfg = compose_experiment(f"rsm_cgs/{dataset}_ipc{ipc}")
    lam, lr, eta, mu = TABLE1[(dataset, ipc)]
    d = cfg.diffusion
    assert (cfg.pipeline.name, d.finetune.objective, d.sample.method) == ("rsm_cgs", "rsm", "cgs")
    assert (d.finetune.rsm["lambda"], d.finetune.lr, d.sample.cgs.eta_dpp, d.sample.cgs.mu_dm) == (lam, lr, eta, mu)
    check_imagenet_common(cfg, dataset, ipc)


@pytest.mark.parametrize("dataset,ipc", list(TABLE1))
def test_minimax_experiments_hold_minimax_settings(dataset, ipc):
    cfg = compose_experiment(f"minimax/{dataset}_ipc{ipc}")
    d = cfg.diffusion
    assert (cfg.pipeline.name, d.finetune.objective, d.sample.method) == ("minimax", "minimax", "independent")
    assert d.finetune.lr == 1e-3
    assert (d.finetune.minimax.lambda_pos, d.finetune.minimax.lambda_neg, d.finetune.minimax.memory) == (
        0.002,
        0.008,
        64,
    )
    check_imagenet_common(cfg, dataset, ipc)


@pytest.mark.parametrize("method", PIPELINES)
@pytest.mark.parametrize("cell", SMALL_CELLS)
def test_small_data_experiments_use_the_pixel_unet_and_their_pipeline(method, cell):
    cfg = compose_experiment(f"{method}/{cell}")
    dataset, ipc = cell.rsplit("_ipc", 1)
    assert (cfg.dataset.name, cfg.ipc, cfg.pipeline.name) == (dataset, int(ipc), method)
    assert list(cfg.pipeline.stages) == ["squeeze", "diffusion", "relabel", "evaluate", "analyse"]
    assert (cfg.diffusion.finetune.objective, cfg.diffusion.sample.method) == RECIPES[method]
    assert cfg.diffusion.backbone == "pixel" and cfg.diffusion.model.pretrained is None


# the tiny pixel UNet the end-to-end runs share (trained once per session, cached)
TINY_PIXEL = [
    "diffusion.model.unet.block_out_channels=[16,32]",
    "diffusion.model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
    "diffusion.model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
    "diffusion.train.steps=20",
    "diffusion.train.batch_size=32",
    "diffusion.finetune.steps=3",
    "diffusion.finetune.batch_size=16",
    "diffusion.sample.steps=5",
]


@pytest.mark.slow
def test_every_diffusion_pipeline_runs_end_to_end_on_digits(tmp_path, cache_dir):
    """The five pipelines one after another in this process, on one cached base model."""
    for method in PIPELINES:
        run_pipeline(f"pipeline={method}", "ipc=2", *TINY_PIXEL, run_dir=tmp_path / method, cache_dir=cache_dir)
    results = {r["method"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("*/results.json"))}
    assert sorted(results) == sorted(PIPELINES)
    for method, r in results.items():
        assert "diffusion" in r["timings"]
        assert r["students"] and 0.0 <= r["students"][0]["acc_mean"] <= 1.0
        meta = json.loads((Path(r["distilled"]) / "meta.json").read_text())
        assert (meta["method"], meta["num_images"]) == (method, 20)
        assert (
            meta["config"]["diffusion"]["finetune"]["objective"],
            meta["config"]["diffusion"]["sample"]["method"],
        ) == RECIPES[method]

    # the base model is trained once; minimax and rsm fine-tune it once each (other tests share the cache)
    def keys(kind):
        return [json.loads((d / "key.json").read_text()) for d in (cache_dir / kind).iterdir()]

    assert sum(k["backbone"] == "pixel" for k in keys("diffusion")) == 1
    assert sum(k["base"]["backbone"] == "pixel" for k in keys("diffusion_finetune")) == 2
