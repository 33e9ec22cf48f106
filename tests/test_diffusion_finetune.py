"""The DiT fine-tuning shared by MiniMax and RSM, against MiniMax's reference: DiffFit's parameter
subset (counted by hand), the label dropped once per sample (not per block), the fixed-decay EMA."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DiTTransformer2DModel
from test_resume import CrashingCodec, Images, assert_killed_denoiser_resumes
from torch import nn

from ddist.config.compat import typed
from ddist.config.schema import DiffusionModelConfig, FinetuneConfig, NoiseScheduleConfig
from ddist.diffusion.sampling import make_scheduler
from ddist.logging import RunLogger
from ddist.models.diffusion import WeightAverage, latent_denoiser
from ddist.training.denoiser import Phase, TrainData, select_parameters, train_denoiser

SCHEDULE = typed(
    NoiseScheduleConfig, {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
)
HEADS, HEAD_DIM, PATCH = 2, 8, 2


def tiny_dit(layers=4, classes=10, channels=4, seed=0):
    """A small DiT whose blocks carry copies of block 0's embedders, as the converted DiT checkpoints."""
    torch.manual_seed(seed)
    net = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=layers,
        patch_size=PATCH,
        in_channels=channels,
        out_channels=2 * channels,
        sample_size=8,
        num_embeds_ada_norm=classes,
    )
    for block in net.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(net.transformer_blocks[0].norm1.emb.state_dict())
    return net


def test_difffit_on_dit_trains_minimaxs_subset_counted_by_hand():
    layers, classes, channels = 4, 10, 4
    net = tiny_dit(layers, classes, channels)
    params, _ = select_parameters(net, "difffit")
    d, p = HEADS * HEAD_DIM, PATCH
    # MiniMax's DiT: bias | norm | gamma | y_embed
    patch_embed = d  # x_embedder.proj.bias
    timestep_mlp = d + d  # t_embedder: the biases of its two Linear layers (one MLP, not one per block)
    class_table = (classes + 1) * d  # y_embedder (with the null class), one table
    per_block = 3 * d + d + 4 * d + d + 6 * d  # q, k, v; attention out; MLP in (4d), out; adaLN modulation (6d)
    final = 2 * d + p * p * 2 * channels  # final adaLN modulation; final linear (eps and variance)
    gammas = (layers // 2) * (3 * d + d + d + d)  # DiffFit scales on the first half of the blocks
    norms = 0  # DiT's LayerNorms have no affine parameters
    expected = patch_embed + timestep_mlp + class_table + layers * per_block + final + gammas + norms
    assert sum(q.numel() for q in params) == expected == 1440
    chosen = {n for n, q in net.named_parameters() if q.requires_grad}
    assert not any(n.endswith("norm1.linear.weight") for n in chosen)  # adaLN modulation weights stay frozen
    assert "proj_out_1.weight" not in chosen and not any("timestep_embedder.linear_1.weight" in n for n in chosen)
    assert all(b.norm1.emb is net.transformer_blocks[0].norm1.emb for b in net.transformer_blocks)  # DiT's one


def test_difffit_starts_at_the_pretrained_function_and_folds_its_scales_back_exactly(tmp_path):
    net = tiny_dit().eval()
    gen = torch.Generator().manual_seed(0)
    z, t, y = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([5, 50, 95]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        before = net(z, t, class_labels=y).sample
        params, finish = select_parameters(net, "difffit")
        assert all(q.requires_grad for q in params)
        torch.testing.assert_close(net(z, t, class_labels=y).sample, before)  # scales 1, embedders equal copies
        for q in params:  # as after some training
            q.add_(0.1 * torch.randn(q.shape, generator=gen))
        trained = net(z, t, class_labels=y).sample
    assert (trained - before).abs().max() > 1e-2
    finish()
    assert not any("gamma" in n for n, _ in net.named_parameters())
    blocks = net.transformer_blocks
    assert blocks[1].norm1.emb is not blocks[0].norm1.emb  # untied copies of the trained embedder
    table = blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.requires_grad and not torch.equal(
        table, tiny_dit().transformer_blocks[0].norm1.emb.state_dict()["class_embedder.embedding_table.weight"]
    )
    assert all(torch.equal(b.norm1.emb.class_embedder.embedding_table.weight, table) for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(net(z, t, class_labels=y).sample, trained, rtol=1e-5, atol=1e-6)
    net.save_pretrained(tmp_path / "dit")  # a plain DiTTransformer2DModel again
    saved = DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(z, t, class_labels=y).sample, trained, rtol=1e-5, atol=1e-6)


def finetune_cfg(steps, batch_size, params="all", label_dropout=0.1, ema=None, ema_schedule="fixed"):
    return typed(
        FinetuneConfig,
        {
            "steps": steps,
            "batch_size": batch_size,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "params": params,
            "label_dropout": label_dropout,
            "seed": 0,
            "ema": ema,
            "ema_schedule": ema_schedule,
            "checkpoint_every": 2,
            "rsm": {"lambda": 3e-3, "reduction": "mean"},
        },
    )


def finetune(net, tcfg, ds, work_dir=None, crash_at=None):
    denoiser = latent_denoiser(net, typed(DiffusionModelConfig, {"class_ids": None}), 4)
    spec = SimpleNamespace(normalize=lambda x: x, denormalize=lambda x: x)
    cpu = torch.device("cpu")
    sched = make_scheduler(SCHEDULE, "ddpm")
    codec = CrashingCodec(crash_at)
    data, phase = TrainData(ds, spec, 8), Phase("finetune", "rsm", tcfg)
    return train_denoiser(denoiser, codec, sched, data, phase, cpu, RunLogger(None), work_dir)


@pytest.mark.parametrize("params,p", [("all", 0.1), ("difffit", 0.3)])
def test_the_training_loop_drops_each_samples_label_in_every_block_or_in_none(params, p):
    """What the class tables embed, per sample, through train_denoiser: a sample is fully conditional
    (share 1 - p) or fully unconditional (p), never partly dropped. Before, each block drew its own
    dropout (block 0's twice): 4 draws of 10% per sample here, 34% partly dropped."""
    layers, steps, batch = 3, 8, 512
    net = tiny_dit(layers, classes=4, channels=1)
    seen = []
    for block in net.transformer_blocks:
        table = block.norm1.emb.class_embedder.embedding_table
        table.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    finetune(net, finetune_cfg(steps, batch, params, label_dropout=p), Images(batch))
    calls = torch.stack(seen).view(steps, layers + 1, batch)  # every block, and block 0's again for the final layer
    null = (calls == 4).transpose(0, 1).reshape(layers + 1, steps * batch)  # 4: the null class id
    dropped = null.sum(0)
    partly = ((dropped > 0) & (dropped < layers + 1)).float().mean().item()
    unconditional = (dropped == layers + 1).float().mean().item()
    conditional = (dropped == 0).float().mean().item()
    assert partly == 0
    assert unconditional == pytest.approx(p, abs=0.03)  # 4096 samples: sd 0.005 (p 0.1), 0.007 (0.3)
    assert conditional == pytest.approx(1 - p, abs=0.03)


def test_the_fixed_ema_is_the_hand_computed_average_from_the_starting_weights():
    net = nn.Linear(2, 1)
    frozen = net.bias.detach().clone()
    net.bias.requires_grad_(False)
    w = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[-1.0, 4.0]])]
    with torch.no_grad():
        net.weight.copy_(w[0])
    ema = WeightAverage(net, [net.weight], 0.9, "fixed", "diffusion.finetune")
    for target in w[1:]:
        with torch.no_grad():
            net.weight.copy_(target)  # an optimiser step
        ema.step()
    state = {k: [s.clone() for s in v] for k, v in ema.state_dict().items()}
    ema.copy_to_net()
    # p_ema = d * p_ema + (1 - d) * p twice from p0: d^2 p0 + d (1 - d) p1 + (1 - d) p2
    expected = torch.tensor([[0.81 * 1 + 0.09 * 3 + 0.1 * -1, 0.81 * -2 + 0.09 * 0 + 0.1 * 4]])
    torch.testing.assert_close(net.weight.detach(), expected)
    torch.testing.assert_close(net.bias, frozen)  # a frozen parameter is its own average
    resumed = WeightAverage(net, [net.weight], 0.9, "fixed", "diffusion.finetune")
    resumed.load_state_dict(state)  # a checkpoint's average comes back
    resumed.copy_to_net()
    torch.testing.assert_close(net.weight.detach(), expected)


def test_fine_tuning_with_the_fixed_ema_saves_the_average_of_the_steps_from_the_pretrained_weights():
    ds = Images(16)

    def run(steps, ema):
        net = tiny_dit(2, classes=4, channels=1)
        finetune(net, finetune_cfg(steps, 8, "all", ema=ema), ds)
        return dict(net.named_parameters())

    start = dict(tiny_dit(2, classes=4, channels=1).named_parameters())
    raw1, raw2, averaged = run(1, None), run(2, None), run(2, 0.9)
    for name, p in averaged.items():
        expected = 0.81 * start[name] + 0.09 * raw1[name] + 0.1 * raw2[name]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    name = "transformer_blocks.0.norm1.linear.bias"
    assert not torch.equal(raw2[name], start[name]) and not torch.equal(averaged[name], raw2[name])


def test_difffit_fine_tuning_with_the_fixed_ema_resumes_to_the_same_weights(tmp_path):
    ds = Images(20)
    tcfg = finetune_cfg(6, 8, "difffit", label_dropout=0.5, ema=0.9)  # a checkpoint every 2 steps

    def run(work_dir, crash_at=None):
        net = tiny_dit(2, classes=4, channels=1)
        return net, finetune(net, tcfg, ds, work_dir, crash_at)

    assert_killed_denoiser_resumes(run, tmp_path, crash_at=6, checkpointed=4)
