"""Students trained together (ddist.training.cohort, ddist.models.stack): a stacked model computes
each copy exactly as the copy alone; a cohort trains each student as it would be trained alone
(byte-identical without stacking, within float rounding with grouped stacking), per architecture;
students resume from their own checkpoints; evaluate.parallel=1 is today's one-at-a-time path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_cfg, read_results, run_pipeline, stage_ctx

from ddist.data import load_split
from ddist.data.subsets import save_random_real
from ddist.models import build_model
from ddist.models.stack import NotStackable, copy_state, load_copy_state, stack_models
from ddist.runtime.artifacts import load_distilled
from ddist.training import cohort
from ddist.training.cohort import Member, Shared, Source, build_stacks, train_cohort

ARCHS = {
    "convnet_batch": {"name": "convnet", "depth": 2, "width": 8, "norm": "batch"},
    "convnet_instance": {"name": "convnet", "depth": 2, "width": 8, "norm": "instance"},
    "convnet_none": {"name": "convnet", "depth": 2, "width": 8, "norm": "none"},
    "resnet_ap10": {"name": "resnet_ap10", "stem": "cifar", "norm": "batch"},
    "resnet18": {"name": "resnet18", "stem": "cifar", "pretrained": False},
}


def _models(model_cfg: dict, k: int, channels: int = 1) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(build_model(model_cfg, 10, channels, 16))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stacked_model_computes_each_copy_as_the_copy_alone(arch):
    models = _models(ARCHS[arch], 3)
    stacked = stack_models(models)
    xs = [torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for train in (True, False):  # batch statistics, then running statistics
        for m in (*models, stacked):
            m.train(train)
        out = stacked(torch.cat(xs, dim=1))
        assert out.shape == (4, 3, 10)
        for k, (m, x) in enumerate(zip(models, xs, strict=True)):
            torch.testing.assert_close(out[:, k], m(x), rtol=1e-4, atol=1e-5)
    # copy k's state is model k's (the running statistics updated by the stacked forward included)
    for k, m in enumerate(models):
        state = copy_state(stacked.state_dict(), k, 3)
        assert state.keys() == m.state_dict().keys()
        for name, value in m.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)


def test_one_copy_is_the_model_itself_and_a_copy_state_loads_into_its_chunk():
    model = _models(ARCHS["convnet_batch"], 1)[0]
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(stack_models([model])(x)[:, 0], model(x))
    models = _models(ARCHS["convnet_batch"], 2)
    stacked = stack_models(models)
    fresh = _models(ARCHS["convnet_batch"], 3)[2].state_dict()
    load_copy_state(stacked, 1, 2, fresh)
    assert torch.equal(copy_state(stacked.state_dict(), 1, 2)["fc.weight"], fresh["fc.weight"])
    assert torch.equal(copy_state(stacked.state_dict(), 0, 2)["fc.weight"], models[0].state_dict()["fc.weight"])


def test_a_model_with_an_unknown_layer_is_not_stacked():
    models = _models(ARCHS["convnet_batch"], 2)
    for m in models:
        m.blocks[0].append(torch.nn.LayerNorm([8, 8, 8]))
    with pytest.raises(NotStackable, match="LayerNorm"):
        stack_models(models)
    members = [Member({"name": "convnet"}, r, 0, None, f"s{r}") for r in range(2)]
    net, where = build_stacks(members, models, grouped=True)  # falls back to one stack per student
    assert len(net.stacks) == 2 and where == [(0, 0), (1, 0)]


# ----------------------------------------------------------------------------- training together


@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory):
    """Two sets of 2 images per class (seeds 0 and 1), a teacher, and a config to train students on them."""
    tmp = tmp_path_factory.mktemp("cohort")
    cfg = compose_cfg(*TINY, "ipc=2", "evaluate.epochs=2", "evaluate.batch_size=8", cache_dir=tmp, run_dir=tmp)
    from ddist.stages import squeeze

    ctx = squeeze.run(cfg, stage_ctx(cfg, tmp))
    train = load_split(cfg.dataset, "train")
    sets = [Source(load_distilled(save_random_real(tmp / f"set{s}", train, ctx.spec, 2, s), ctx.spec)) for s in (0, 1)]
    return cfg, ctx, sets, load_split(cfg.dataset, "test")


def _trained(digits_sets, arch: str, grouped: bool, together: bool, protocol: str = "soft", epochs: int = 2):
    """Per member (repeats 0 and 1 on set 0, repeat 0 on set 1): its trained weights and accuracy."""
    cfg, ctx, sets, test = digits_sets
    ev = cfg.evaluate.copy()
    ev.protocol, ev.epochs = protocol, epochs
    if (
        protocol == "hard"
    ):  # with SGD: AdamW turns the float noise of a zero gradient (a conv bias before BatchNorm) into +-lr
        ev.optimizer, ev.lr = "sgd", 0.01
    teacher = None
    if protocol == "soft":
        from ddist.training.teacher import frozen_teacher, load_teacher

        teacher = frozen_teacher(cfg, load_teacher(cfg, ctx))
    shared = Shared(ev, teacher, test, grouped)
    members = [Member(ARCHS[arch], r, s, None, f"m{r}{s}") for r, s in ((0, 0), (1, 0), (0, 1))]
    weights: list[dict] = []
    real = cohort.cohort_accuracy

    def spy(net, where, *a, **k):
        weights.extend(copy_state(net.stacks[g].state_dict(), i, len(net.sources[g])) for g, i in where)
        return real(net, where, *a, **k)

    cohort.cohort_accuracy = spy
    try:
        if together:
            accs = train_cohort(cfg, ctx, shared, sets, members)
        else:
            accs = [
                train_cohort(cfg, ctx, shared, [sets[m.source]], [Member(m.model_cfg, m.repeat, 0, None, m.key)])[0]
                for m in members
            ]
    finally:
        cohort.cohort_accuracy = real
    return weights, accs


def test_a_cohort_without_stacking_is_byte_identical_to_training_each_student_alone(digits_sets):
    alone, alone_accs = _trained(digits_sets, "convnet_batch", grouped=False, together=False)
    together, accs = _trained(digits_sets, "convnet_batch", grouped=False, together=True)
    assert accs == alone_accs
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_stacking_trains_each_student_as_alone_within_float_rounding(digits_sets, arch):
    """One epoch (3 steps). float32 rounding differs between a grouped and a plain convolution; a
    ResNet-18 on 16px images amplifies it (BatchNorm over the 2x2 maps of a last batch of 4 images:
    1e-6 in the logits became 1e-2 in conv1 in 3 steps), so there only the accuracies are compared;
    that the computation is exact for every architecture is the float64 test's."""
    alone, alone_accs = _trained(digits_sets, arch, grouped=False, together=False, protocol="hard", epochs=1)
    stacked, accs = _trained(digits_sets, arch, grouped=True, together=True, protocol="hard", epochs=1)
    for a, b in zip(alone, stacked, strict=True):
        for name in a:
            if a[name].dtype.is_floating_point and arch != "resnet18":
                torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-3)
    assert max(abs(x - y) for x, y in zip(accs, alone_accs, strict=True)) <= 0.02


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_training_is_exact_in_float64(arch):
    """Five SGD steps (momentum, weight decay) of 2 stacked copies on their own batches equal the
    copies' own steps to 1e-12 in float64: stacking changes rounding, not the computation."""
    models = [m.double() for m in _models(ARCHS[arch], 2)]
    stacked = stack_models([copy.deepcopy(m) for m in models])
    opts = [
        torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4)
        for p in ([m.parameters() for m in models] + [stacked.parameters()])
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xs = [torch.randn(8, 1, 16, 16, generator=gen, dtype=torch.float64) for _ in models]
        y = torch.randint(0, 10, (8,), generator=gen)
        out = stacked(torch.cat(xs, dim=1))
        losses = [F.cross_entropy(m(x), y) for m, x in zip(models, xs, strict=True)]
        losses.append(sum(F.cross_entropy(out[:, k], y) for k in range(2)))
        for opt, loss in zip(opts, losses, strict=True):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for k, m in enumerate(models):
        state = copy_state(stacked.state_dict(), k, 2)
        for name, value in m.state_dict().items():
            assert (state[name].double() - value.double()).abs().max() < 1e-12, name


def test_per_student_gradient_clipping_equals_clipping_each_alone():
    models = _models(ARCHS["convnet_batch"], 3)
    twins = [m for m in _models(ARCHS["convnet_batch"], 3)]
    members = [Member({}, r, 0, None, f"m{r}") for r in range(3)]
    net, where = build_stacks(members, twins, grouped=True)
    x = torch.randn(4, 1, 16, 16)
    scales = [1.0, 10.0, 100.0]  # three gradient sizes: clipped or not at max_norm 1
    out = net([x])[0]
    sum((s * out[:, k]).pow(2).mean() for k, s in enumerate(scales)).backward()
    cohort.per_copy_clip(net)(1.0)
    for k, (m, s) in enumerate(zip(models, scales, strict=True)):
        (s * m(x)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)
        grads = {n: p.grad for n, p in m.named_parameters()}
        stacked = {n: p.grad.chunk(3)[k] for n, p in net.stacks[0].model.named_parameters()}
        for n in grads:
            torch.testing.assert_close(stacked[n], grads[n], rtol=1e-4, atol=1e-6)
    assert where == [(0, 0), (0, 1), (0, 2)]


# ----------------------------------------------------------------------------- the evaluate stage


def test_parallel_students_give_the_sequential_results_and_share_the_teacher(tmp_path, cache_dir, monkeypatch):
    """repeats=2 with the baseline: 4 students. parallel=1 (one after another) and parallel=4 (one
    cohort, no stacking on a CPU) give the same accuracies; the cohort runs the teacher once per set
    per step (2 sets) instead of once per student."""
    from ddist.training import teacher as teacher_mod

    calls = {"n": 0}
    real = teacher_mod.frozen_teacher

    def counting(cfg, model):
        frozen = real(cfg, model)
        hook = frozen.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        frozen.hook = hook
        return frozen

    monkeypatch.setattr("ddist.training.students.frozen_teacher", counting)
    results = {}
    for k in (1, 4):
        calls["n"] = 0
        out = run_pipeline(
            "pipeline=random",
            "evaluate.repeats=2",
            f"evaluate.parallel={k}",
            "evaluate.baseline=random",
            run_dir=tmp_path / f"p{k}",
            cache_dir=tmp_path / f"cache{k}",
        )
        results[k] = (out["students"][0]["accs"], calls["n"])
    assert results[1][0] == results[4][0]
    assert results[4][1] * 2 == results[1][1]  # pipeline=random: its own baseline, 1 set, 2 repeats


def test_a_killed_cohort_resumes_each_student_from_its_own_checkpoint(tmp_path):
    """Students checkpoint in the format of a student trained alone: a cohort of 3 killed midway
    resumes, as a cohort (parallel=3) or one student at a time (parallel=1), to the accuracies of an
    uninterrupted run."""
    from conftest import kill_when, start_forked_run

    common = ["pipeline=random", "evaluate.repeats=3", "evaluate.epochs=40", "checkpoint_interval=0"]
    full = run_pipeline(*common, "evaluate.parallel=3", run_dir=tmp_path / "full", cache_dir=tmp_path / "c_full")
    for k in (3, 1):
        cache = tmp_path / f"c_kill{k}"
        child = start_forked_run(*common, "evaluate.parallel=3", run_dir=tmp_path / f"killed{k}", cache_dir=cache)
        kill_when(child, lambda cache=cache: len(list((cache / "student").glob("*/partial.pt"))) == 3)
        assert child.exitcode == -9
        resumed = run_pipeline(*common, f"evaluate.parallel={k}", run_dir=tmp_path / f"resumed{k}", cache_dir=cache)
        assert resumed["students"][0]["accs"] == full["students"][0]["accs"]
        assert read_results(tmp_path / f"resumed{k}")["students"][0]["accs"] == full["students"][0]["accs"]
