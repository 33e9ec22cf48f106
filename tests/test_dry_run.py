"""dry_run=true runs every experiment file and every pipeline: each model built, each stage one step.

The runs go through pipeline.run in this process (Hydra's compose API), which saves each the
~6 s of imports a `python -m ddist` costs; one subprocess checks the command line itself.
The data root lies in tmp_path, so every dataset but digits is the synthetic stand-in, as in CI.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CONF, run_ddist, run_pipeline
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ddist import pipeline
from ddist.config.dry_run import prepare
from ddist.errors import ConfigError
from ddist.models import student_config

EXPERIMENTS = sorted(
    p.relative_to(CONF / "experiment").with_suffix("").as_posix() for p in (CONF / "experiment").rglob("*.yaml")
)
PIPELINES = sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))
# cells on DiT-XL/2 and the SD VAEs: building those alone takes ~15 s and a step ~1 min on a CPU
DIT_XL = [e for e in EXPERIMENTS if e.split("/")[0] in ("minimax", "rsm_cgs") and "image" in e]
# the default tier shrinks them (random weights either way: the pretrained ones are not here)
SMALL_LATENT = [
    "diffusion.model.dit.num_layers=1",
    "diffusion.model.dit.num_attention_heads=2",
    "diffusion.model.dit.attention_head_dim=8",
    "diffusion.model.vae_config.block_out_channels=[8,8,8,8]",
    "diffusion.model.vae_config.layers_per_block=1",
    "diffusion.model.vae_config.norm_num_groups=8",
]


def compose_dry_run(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                *overrides,
                "dry_run=true",
                "logger=none",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'run'}",
            ],
        )


def check_dry_run(tmp_path: Path, *overrides: str) -> dict:
    """Run one dry run in-process; check it ran every stage, built every student, and wrote no real cache."""
    return check_composed_dry_run(tmp_path, compose_dry_run(tmp_path, *overrides))


def check_composed_dry_run(tmp_path: Path, cfg) -> dict:
    """check_dry_run of a config composed by compose_dry_run(tmp_path, ...)."""
    results = pipeline.run(cfg)
    run = tmp_path / "run"
    written = json.loads((run / "dry_run.json").read_text())
    assert results["dry_run"] and written["dry_run"] and written["students"] == results["students"]
    assert not (run / "results.json").exists()  # reports never count a dry run
    assert list(results["timings"]) == list(cfg.pipeline.stages)
    assert [s["name"] for s in results["students"]] == [student_config(s)[0] for s in cfg.evaluate.students]
    images = load_file(Path(results["distilled"]) / "data.safetensors")["images"]
    classes = min(2, cfg.dataset.num_classes or 2)
    assert images.shape[0] == classes * min(cfg.ipc, 2) and images.shape[-1] == cfg.dataset.resolution
    # caches live in the run directory, deleted at the end: the configured cache (root_dir/outputs/cache) is untouched
    assert not (run / "dry_run_cache").exists() and not (tmp_path / "outputs").exists()
    return results


def _cell(experiment: str) -> str:
    """An experiment's cell without its IPC: the files of one cell differ in IPC and the settings that scale
    with it, which the dry run cuts (IPC 2, one step), so most of them cut to one and the same run."""
    return re.sub(r"_ipc\d+$", "", experiment)


CELLS = sorted({_cell(e) for e in EXPERIMENTS})


def _what_runs(cut) -> str:
    """A cut config with every float value blanked (paths left out: they name tmp_path): files whose cut
    configs differ only in weights and rates (RSM's lambda, CGS's mu_DM) build the same models and take
    the same code paths; ints stay, since they size things."""

    def blank(node):
        if isinstance(node, dict):
            return {k: blank(v) for k, v in node.items()}
        if isinstance(node, list):
            return [blank(v) for v in node]
        return "<float>" if isinstance(node, float) else node

    return repr(blank(OmegaConf.to_container(OmegaConf.masked_copy(cut, [k for k in cut if k != "paths"]))))


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_every_experiment_file_dry_runs(tmp_path, cell):
    """Every file of the cell composes, cuts and passes the run's checks; each distinct cut config (up to
    its float values, _what_runs) runs once: the other files would make the very same run. Without the
    random-real baseline, which would train the very same students again (test_every_pipeline_dry_runs
    runs it in every pipeline)."""
    ran: set[str] = set()
    for i, experiment in enumerate(e for e in EXPERIMENTS if _cell(e) == cell):
        root = tmp_path / str(i)
        shrink = SMALL_LATENT if experiment in DIT_XL else []
        cfg = compose_dry_run(root, f"experiment={experiment}", "evaluate.baseline=none", *shrink)
        cut = prepare(cfg)
        pipeline.validate(cut)  # every value of every file, run or not
        key = _what_runs(cut)
        if key not in ran:
            check_composed_dry_run(root, cfg)
            ran.add(key)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_dry_runs(tmp_path, name):
    check_dry_run(tmp_path, f"pipeline={name}")


def test_dry_run_cuts_stored_labels_and_robust_score_baselines_too(tmp_path):
    results = check_dry_run(tmp_path, "pipeline=sre2l", "relabel=stored", "analyse.robust_scores=true")
    assert set(results["analysis"]["robust"]) >= {"ior", "hlr", "lrs", "ars"}
    assert json.loads((tmp_path / "run" / "relabel" / "meta.json").read_text())["epochs"] == 1


@pytest.mark.slow
@pytest.mark.full_size
def test_dit_xl_cells_dry_run_at_full_size(tmp_path):
    """DiT-XL/2 (28 layers, 1000-class table) and the SD VAE as configured, random weights; one cell after
    the other in one test (~10 GB each: parallel workers must never hold two)."""
    for experiment, class_ids in [("minimax/imagenette_ipc10", [0, 217]), ("rsm_cgs/imagewoof_ipc10", [193, 182])]:
        root = tmp_path / experiment.replace("/", "_")
        results = check_dry_run(root, f"experiment={experiment}")
        meta = json.loads((Path(results["distilled"]) / "meta.json").read_text())
        model = meta["config"]["diffusion"]["model"]
        dit = model["dit"]
        assert model["random_weights"] and (dit["num_layers"], dit["num_embeds_ada_norm"]) == (28, 1000)
        assert model["class_ids"] == class_ids


def test_dry_run_cuts_steps_and_data_but_keeps_the_models(tmp_path):
    cfg = compose_dry_run(tmp_path, "experiment=rsm_cgs/imagenette_ipc50")
    cut = prepare(cfg)
    assert (cut.dataset.format, dict(cut.dataset.subset), cut.dataset.resolution) == (
        "synthetic",
        {"classes": 2, "per_class": 2},
        224,
    )
    assert list(cut.diffusion.model.class_ids) == [0, 217]  # ImageNette's first two ImageNet ids
    assert cut.diffusion.model.random_weights and cut.diffusion.model.dit == cfg.diffusion.model.dit
    assert (cut.ipc, cut.evaluate.epochs, cut.diffusion.finetune.steps, cut.diffusion.sample.steps) == (2, 1, 1, 1)
    assert cut.evaluate.students == cfg.evaluate.students and cut.teacher.model == cfg.teacher.model
    assert cut.paths.cache_dir == str(tmp_path / "run" / "dry_run_cache")
    # the given config is left as it was: the whole dataset
    assert cfg.ipc == 50 and dict(cfg.dataset.subset) == {"classes": None, "per_class": None}
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        prepare(compose_dry_run(tmp_path, f"teacher.checkpoint={tmp_path}/missing.pt"))


@pytest.mark.slow
def test_dry_run_from_the_command_line(tmp_path):
    """`python -m ddist experiment=... dry_run=true`: the printed table, dry_run.json and no cache (each
    experiment's own run is test_every_experiment_file_dry_runs; this is the command line's)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_ddist(
        "experiment=sre2l/digits_ipc10",
        "dry_run=true",
        "logger=none",
        run_dir=run_dir,
        cache_dir=cache,
        tiny=False,
    )
    results = json.loads((run_dir / "dry_run.json").read_text())
    assert [s["name"] for s in results["students"]] == ["convnet"]
    assert "dry run: sre2l on digits, IPC 2" in proc.stdout
    assert not cache.exists()


def test_dry_run_deletes_its_cache_and_keeps_its_result(tmp_path):
    """The private cache (teacher, fine-tuned DiT: 3 GB at full size) goes; dry_run.json and the logs stay."""
    run = tmp_path / "run"
    results = run_pipeline("experiment=sre2l/digits_ipc10", "dry_run=true", run_dir=run, cache_dir=tmp_path / "cache")
    assert results["dry_run"] and (run / "dry_run.json").is_file()
    assert not (run / "dry_run_cache").exists() and not (tmp_path / "cache").exists()
