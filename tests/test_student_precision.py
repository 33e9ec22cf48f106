"""evaluate.precision: the students' autocast. auto resolves by the device (bf16 where it is native,
the run's precision elsewhere); bf16 students really compute in bf16, in training and in their test
pass; an fp32 student keeps the store key it had before the option existed."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_cfg, stage_ctx

from ddist.data import load_split
from ddist.data.subsets import save_random_real
from ddist.runtime.artifacts import load_distilled
from ddist.training import cohort, loop
from ddist.training.cohort import Member, Shared, Source, train_cohort
from ddist.training.loop import student_precision
from ddist.training.students import student_base_key

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_where_native_and_the_run_precision_elsewhere(monkeypatch, native):
    monkeypatch.setattr(loop, "native_bf16", lambda device: native)
    assert student_precision("auto", "fp32", CPU) == ("bf16" if native else "fp32")
    assert student_precision("auto", "fp16", CPU) == ("bf16" if native else "fp16")
    for given in ("fp32", "bf16", "fp16"):  # an explicit setting is kept whatever the device
        assert student_precision(given, "fp32", CPU) == given


def test_native_bf16_follows_the_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert loop.native_bf16(CPU)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True})
    assert not loop.native_bf16(CPU)  # avx512-bf16 alone: no AMX tiles, measured no faster
    assert not loop.native_bf16(torch.device("meta"))


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    cfg = compose_cfg(*TINY, "ipc=2", "evaluate.epochs=2", "evaluate.batch_size=8", cache_dir=tmp, run_dir=tmp)
    from ddist.stages import squeeze

    ctx = squeeze.run(cfg, stage_ctx(cfg, tmp))
    path = save_random_real(tmp / "set", load_split(cfg.dataset, "train"), ctx.spec, 2, 0)
    return cfg, ctx, path


def test_an_fp32_student_keeps_its_key_and_a_bf16_one_gets_another(digits_set, monkeypatch):
    cfg, ctx, path = digits_set
    distilled = load_distilled(path, ctx.spec)
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)

    def key(precision: str) -> dict:
        ev = cfg.evaluate.copy()
        ev.precision = precision
        return student_base_key(cfg, ev, distilled, ctx)

    fp32 = key("fp32")
    assert "precision" not in fp32["evaluate"] and fp32["precision"] == "fp32"  # where the run's precision was
    assert key("auto") == fp32  # auto on a device without native bf16 is the run's fp32
    assert key("bf16") != fp32 and key("bf16")["precision"] == "bf16"
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    assert key("auto") == key("bf16")


def test_bf16_students_train_and_test_in_bf16(digits_set, monkeypatch):
    cfg, ctx, path = digits_set
    from ddist.training.teacher import frozen_teacher, load_teacher

    ev = cfg.evaluate.copy()
    teacher = frozen_teacher(cfg, load_teacher(cfg, ctx))
    test = load_split(cfg.dataset, "test")
    seen: dict[str, set] = {"train": set(), "test": set()}
    real_accuracy = cohort.cohort_accuracy

    def trained(precision: str) -> float:
        ev.precision = precision
        shared = Shared(ev, teacher, test, False)
        members = [Member({"name": "convnet", "width": 16}, 0, 0, None, "s")]
        return train_cohort(cfg, ctx, shared, [Source(load_distilled(path, ctx.spec))], members)[0]

    def spy(net, *args, **kwargs):  # the test pass: record the logits' dtype from inside it
        hook = net.register_forward_hook(lambda m, i, out: seen["test"].add(out[0].dtype))
        try:
            return real_accuracy(net, *args, **kwargs)
        finally:
            hook.remove()

    def conv_dtype(module, inputs, out):  # every convolution's output, training steps included
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen["train"].add(out.dtype)

    monkeypatch.setattr(cohort, "cohort_accuracy", spy)
    hook = torch.nn.modules.module.register_module_forward_hook(conv_dtype)
    try:
        fp32 = trained("fp32")
        assert seen == {"train": {torch.float32}, "test": {torch.float32}}
        seen = {"train": set(), "test": set()}
        bf16 = trained("bf16")
    finally:
        hook.remove()
    assert torch.bfloat16 in seen["train"] and seen["test"] == {torch.bfloat16}
    assert 0.0 <= bf16 <= 1.0 and abs(bf16 - fp32) < 0.25  # two epochs on 20 images: same ballpark, not equal


def test_the_results_say_which_precision_the_students_trained_in(tmp_path, cache_dir):
    from conftest import run_pipeline

    results = run_pipeline("ipc=1", "evaluate.precision=bf16", run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert [s["precision"] for s in results["students"]] == ["bf16"]
    assert [s["precision"] for s in results["baseline"]["students"]] == ["bf16"]
