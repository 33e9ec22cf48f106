"""Killed training (teacher, students, diffusion models) resumes where it stopped and ends
byte-identical to an uninterrupted run."""

from __future__ import annotations

import logging
import signal
from types import SimpleNamespace

import pytest
import torch
from conftest import kill_when, read_results, run_logged, run_pipeline, start_forked_run
from diffusers import UNet2DModel

from ddist.config.compat import typed
from ddist.config.schema import DiffusionModelConfig, FinetuneConfig, NoiseScheduleConfig
from ddist.diffusion.sampling import make_scheduler
from ddist.logging import RunLogger
from ddist.models.diffusion import PixelCodec, pixel_denoiser
from ddist.runtime.artifacts import load_checkpoint
from ddist.training import engine
from ddist.training.denoiser import Phase, TrainData, train_denoiser
from ddist.training.engine import Loop, Optim
from ddist.training.loop import CHECKPOINT, Amp, Logging, fit


def _train(work, crash_at=None, precision="fp32", dtypes=None):
    """A tiny regression fit over a seeded stream (3 steps an epoch, 4 epochs); optionally crash."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 12)
    gen = torch.Generator().manual_seed(1)
    stream = ((torch.randn(5, 4, generator=gen), torch.randn(5, 1, generator=gen)) for _ in range(12))
    seen = []

    def loss_fn(m, batch):
        seen.append(len(seen))
        if crash_at is not None and len(seen) > crash_at:
            raise KeyboardInterrupt  # stands for a kill: nothing after this point runs
        x, y = batch
        out = m(x)
        if dtypes is not None:
            dtypes.append(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), y)

    fit(
        model,
        stream,
        loss_fn,
        Optim(opt, list(model.parameters()), schedule),
        Loop(total=12, desc="t", stage="t", hint=""),
        Logging(RunLogger(None), every=100, steps_per_epoch=3),
        work_dir=work,
        amp=Amp(precision),
    )
    return model, len(seen)


def test_fit_resumes_from_the_last_epoch_and_matches_an_uninterrupted_run(tmp_path):
    reference, _ = _train(None)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, crash_at=7)  # during the third epoch: two epochs are checkpointed
    assert (tmp_path / CHECKPOINT).is_file()
    resumed, computed = _train(tmp_path)
    assert computed == 12 - 6  # only the unfinished epochs ran again
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    assert not (tmp_path / CHECKPOINT).exists()  # a finished fit leaves no partial checkpoint


def test_a_throttle_spaces_checkpoints_and_decides_once_per_step_for_all_that_share_it(tmp_path, monkeypatch):
    """A clock that ticks one second per reading: with a 2.5 s throttle the checkpoints due every step
    are taken at steps 3 and 6 (the first due 2.5 s after the last), and a second Checkpoint asking in
    the same step (a cohort's next student), when the clock has moved on, gets the same answer."""
    ticks = iter(range(100))
    saved: list[tuple[str, int]] = []
    monkeypatch.setattr(engine, "save_partial", lambda work_dir, step, parts: saved.append((work_dir.name, step)))
    throttle = engine.Throttle(2.5, clock=lambda: float(next(ticks)))  # made at t = 0
    students = [engine.Checkpoint(tmp_path / name, 1, 100, {}, throttle) for name in ("a", "b")]
    for done in range(1, 8):
        for checkpoint in students:
            checkpoint.on_step(done, torch.tensor(0.0), {})
    assert saved == [("a", 3), ("b", 3), ("a", 6), ("b", 6)]


def test_checkpoint_interval_spaces_the_fit_checkpoints_in_time(tmp_path, monkeypatch):
    """fit with a long checkpoint_interval saves none of its epochs; with 0 it saves every one."""
    saved: list[int] = []
    monkeypatch.setattr(engine, "save_partial", lambda work_dir, step, parts: saved.append(step))
    for interval, want in ((3600.0, []), (0.0, [3, 6, 9])):
        saved.clear()
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stream = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(12)]
        fit(
            model,
            stream,
            lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
            Optim(opt, list(model.parameters())),
            Loop(total=12, desc="t", stage="t", hint=""),
            Logging(RunLogger(None), every=100, steps_per_epoch=3, checkpoint_interval=interval),
            work_dir=tmp_path,
        )
        assert saved == want


@pytest.mark.slow
def test_a_killed_teacher_training_resumes_to_the_same_weights(tmp_path, caplog):
    """The run that is killed is a forked child (SIGKILL); the reference and the rerun run in-process."""
    args = ["pipeline.stages=[squeeze]", "teacher.epochs=8", "checkpoint_interval=0"]
    run_pipeline(*args, run_dir=tmp_path / "ref", cache_dir=tmp_path / "ref_cache")
    cache = tmp_path / "cache"
    proc = start_forked_run(*args, run_dir=tmp_path / "a", cache_dir=cache)
    kill_when(proc, lambda: any(cache.glob(f"teacher/*/{CHECKPOINT}")))
    assert proc.exitcode == -signal.SIGKILL, "the teacher finished before it could be killed"
    assert not list(cache.glob("teacher/*/teacher.pt"))
    rerun = run_logged(*args, run_dir=tmp_path / "b", cache_dir=cache, caplog=caplog)
    assert "resuming at step" in rerun
    (ref,) = (tmp_path / "ref_cache").glob("teacher/*/teacher.pt")
    (got,) = cache.glob("teacher/*/teacher.pt")
    a, b = load_checkpoint(ref, "x")["state_dict"], load_checkpoint(got, "x")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_students_are_not_trained_again(tmp_path, caplog):
    cache_dir = tmp_path / "cache"  # its own: the session cache may already hold this student
    logs = []
    for run in ("a", "b"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ddist"):
            run_pipeline("pipeline=random", "ipc=2", run_dir=tmp_path / run, cache_dir=cache_dir)
        logs.append(caplog.text)
    assert "finished earlier" not in logs[0]
    assert "finished earlier" in logs[1]
    assert read_results(tmp_path / "a")["students"] == read_results(tmp_path / "b")["students"]
    # a truncated result.json is the entry's damage: named, and the student trained again
    (result,) = (cache_dir / "student").glob("*/result.json")  # the run's set and the baseline share it
    result.chmod(0o644)  # read-only once cached; root writes anyway
    result.write_text('{"acc": 0.')
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddist"):
        run_pipeline("pipeline=random", "ipc=2", run_dir=tmp_path / "c", cache_dir=cache_dir)
    assert f"The cached student at {result.parent} has result.json of 10 bytes" in caplog.text
    assert "building it again" in caplog.text
    assert read_results(tmp_path / "c")["students"] == read_results(tmp_path / "a")["students"]


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_runs_the_forward_pass_in_low_precision(precision, dtype):
    dtypes: list[torch.dtype] = []
    model, _ = _train(None, precision=precision, dtypes=dtypes)
    assert set(dtypes) == {dtype}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    reference, _ = _train(None)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=False))


# ----------------------------------------------------------------------------- diffusion training


class Images:
    """A tiny in-memory split: n random 8x8 greyscale images of 4 classes."""

    def __init__(self, n=20):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
        self.targets = torch.arange(n) % 4

    def __len__(self):
        return len(self.targets)


class CrashingCodec(PixelCodec):
    """The pixel codec (with a 1-channel DiT, it stands in for the latent one too), killed
    (KeyboardInterrupt) at its encode call number `crash_at`."""

    def __init__(self, crash_at=None):
        self.calls, self.crash_at = 0, crash_at

    def encode(self, x, sample=False):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return x


def _train_denoiser(work, objective, crash_at=None, ema=None, ema_schedule="warmup"):
    """12 steps of batch 8 over 20 images (an epoch is 3 batches), a checkpoint every 4 steps."""
    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        num_class_embeds=5,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    denoiser = pixel_denoiser(net, typed(DiffusionModelConfig, {"class_ids": None}), 4)
    spec = SimpleNamespace(normalize=lambda x: x, denormalize=lambda x: x)
    schedule = {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    tcfg = {
        "steps": 12,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "params": "all",
        "label_dropout": 0.3,
        "seed": 0,
        "checkpoint_every": 4,
        "ema": ema,
        "ema_schedule": ema_schedule,
        "minimax": {"lambda_pos": 0.1, "lambda_neg": 0.1, "memory": 3},
    }
    losses = train_denoiser(
        denoiser,
        CrashingCodec(crash_at),
        make_scheduler(typed(NoiseScheduleConfig, schedule), "ddpm"),
        TrainData(Images(), spec, 8),
        Phase("train", objective, typed(FinetuneConfig, tcfg)),  # as train's node, with minimax's settings
        torch.device("cpu"),
        RunLogger(None),
        work_dir=work,
    )
    return net, losses


@pytest.mark.parametrize(
    ("objective", "ema", "schedule"),
    [("plain", None, "warmup"), ("minimax", None, "warmup"), ("plain", 0.9, "warmup"), ("plain", 0.9, "fixed")],
)
def test_diffusion_training_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(
    tmp_path, objective, ema, schedule
):
    # with ema, the saved weights are the average: it must come back from the checkpoint too
    def run(work_dir, crash_at=None):
        return _train_denoiser(work_dir, objective, crash_at=crash_at, ema=ema, ema_schedule=schedule)

    assert_killed_denoiser_resumes(run, tmp_path, crash_at=11, checkpointed=8)  # in the fourth epoch


def assert_killed_denoiser_resumes(run, work_dir, crash_at: int, checkpointed: int):
    """The denoiser's kill-and-resume scenario: run(work_dir, crash_at) -> (net, losses of the steps it ran),
    killed at its encode call `crash_at` (after step `checkpointed`'s checkpoint), then run again to the end,
    ends with the losses and weights of an uninterrupted run(None) and leaves no checkpoint behind."""
    reference, reference_losses = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(work_dir, crash_at)
    assert (work_dir / CHECKPOINT).is_file()
    resumed, losses = run(work_dir)
    assert losses == reference_losses[checkpointed:]  # the steps after it ran again, on the same batches and noise
    a, b = reference.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (work_dir / CHECKPOINT).exists()


@pytest.mark.slow  # three training runs of the diffusion model, one of them killed
def test_a_killed_diffusion_training_resumes_to_the_same_model(tmp_path, caplog):
    args = [
        "ipc=1",
        "pipeline=diffusion",
        "pipeline.stages=[diffusion]",
        "diffusion.model.unet.block_out_channels=[8,16]",
        "diffusion.model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
        "diffusion.model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
        "diffusion.model.unet.norm_num_groups=4",
        "diffusion.train.steps=60",
        "diffusion.train.batch_size=32",
        "diffusion.train.checkpoint_every=10",
        "diffusion.sample.steps=2",
    ]
    run_pipeline(
        *args, "diffusion.train.checkpoint_every=7", run_dir=tmp_path / "ref", cache_dir=tmp_path / "ref_cache"
    )
    cache = tmp_path / "cache"
    proc = start_forked_run(*args, run_dir=tmp_path / "a", cache_dir=cache)
    kill_when(proc, lambda: any(cache.glob(f"diffusion/*/{CHECKPOINT}")))
    assert proc.exitcode == -signal.SIGKILL, "the training finished before it could be killed"
    assert not list(cache.glob("diffusion/*/denoiser"))
    rerun = run_logged(*args, run_dir=tmp_path / "b", cache_dir=cache, caplog=caplog)
    assert "diffusion train: resuming at step" in rerun
    # the same model (checkpoint_every is not in the key: the reference made it with other checkpoints)
    (ref,) = (tmp_path / "ref_cache").glob("diffusion/*/denoiser/*.safetensors")
    (got,) = cache.glob("diffusion/*/denoiser/*.safetensors")
    assert ref.parent.parent.name == got.parent.parent.name
    assert ref.read_bytes() == got.read_bytes()
    assert (tmp_path / "ref" / "distilled" / "data.safetensors").read_bytes() == (
        tmp_path / "b" / "distilled" / "data.safetensors"
    ).read_bytes()
