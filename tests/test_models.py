"""Model registry: shapes, feature API, config errors, pretrained-offline behaviour, conf files."""

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models
from omegaconf import OmegaConf
from torch import nn

from ddist.errors import ConfigError
from ddist.models import MODEL_NAMES, build_model, preset_names, student_config
from ddist.models.base import spatial_mean

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
SIZES = [(1, 16), (3, 32), (3, 64)]
STAGE_WIDTHS = {
    "convnet": [128, 128, 128],
    "resnet18": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet_ap10": [64, 128, 256, 512],
}


def _penultimate_width(name: str, resolution: int) -> int:
    if name == "convnet":
        return 128 * (resolution // 8) ** 2  # three halvings, flattened
    return STAGE_WIDTHS[name][-1]


@pytest.mark.parametrize("channels,resolution", SIZES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_exposes_features(name, channels, resolution):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, channels=channels, resolution=resolution).eval()
    x = torch.randn(2, channels, resolution, resolution)
    fc_inputs = []
    model.fc.register_forward_hook(lambda mod, args, out: fc_inputs.append(args[0]))
    with torch.no_grad():
        logits = model(x)
        logits_ff, feats = model.forward_features(x)

    assert logits.shape == (2, 7)
    assert torch.allclose(logits, logits_ff, atol=1e-6)
    widths = STAGE_WIDTHS[name]
    assert model.feature_names == [f"stage{i}" for i in range(1, len(widths) + 1)] + ["penultimate"]
    assert list(feats) == model.feature_names
    for key, width in zip(model.feature_names, widths, strict=False):
        assert feats[key].shape == (2, width)
    assert feats["penultimate"].shape == (2, _penultimate_width(name, resolution))
    # the second hook call is forward_features' pass: its fc input is the returned feature
    assert len(fc_inputs) == 2
    assert torch.equal(feats["penultimate"], fc_inputs[1])


def test_features_come_from_one_pass():
    model = build_model("convnet", 10, 3, 32)
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    model.forward_features(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1


def test_stage_features_are_pooled_block_outputs():
    model = build_model({"name": "convnet", "depth": 2, "width": 8}, 3, 1, 8).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        _, feats = model.forward_features(x)
        block1 = model.blocks[0](x)
        block2 = model.blocks[1](block1)
    assert torch.allclose(feats["stage1"], block1.mean(dim=(2, 3)))
    assert torch.allclose(feats["stage2"], block2.mean(dim=(2, 3)))
    assert torch.equal(feats["penultimate"], block2.flatten(1))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spatial_mean_is_the_mean_with_its_gradient_in_the_input_layout(layout):
    # a map that feeds the next conv and, afterwards, its stage feature (as FeatureModel.features after
    # _trunk, in DEDA's recover): the two gradients meet at it, the feature's first. torch's mean backward
    # made their sum NCHW for a channels_last map (then every layer below ran its NCHW backward and
    # converted layouts). The values must be the mean's, forward and backward.
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).to(memory_format=layout)
    x0, grads = torch.randn(3, 4, 6, 6).contiguous(memory_format=layout), {}
    for name, mean in (("torch", lambda t: t.mean(dim=(2, 3))), ("ddist", spatial_mean)):
        x = x0.clone().requires_grad_()
        h = torch.relu(x)
        h.register_hook(lambda g, name=name: grads.setdefault(name, g))
        out = conv(h)
        y = mean(h)
        assert torch.equal(y, h.detach().mean(dim=(2, 3)))
        (y.square().sum() + out.square().sum()).backward()
    assert torch.equal(grads["ddist"], grads["torch"])
    assert grads["ddist"].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_global_average_pool_is_spatial_mean(name):
    # the stage features, and the ResNets' head (ConvNet's penultimate is its flattened map)
    model = build_model(name, num_classes=10, channels=3, resolution=32)
    _, feats = model.forward_features(torch.randn(2, 3, 32, 32))
    pooled = [key for key in feats if key != "penultimate" or name != "convnet"]
    assert {key: type(feats[key].grad_fn).__name__ for key in pooled} == dict.fromkeys(pooled, "_SpatialMeanBackward")


def test_convnet_stops_pooling_at_one_pixel():
    model = build_model({"name": "convnet", "depth": 6, "width": 4}, 10, 1, 16)
    pools = [isinstance(b[-1], nn.AvgPool2d) for b in model.blocks]
    assert pools == [True, True, True, True, False, False]
    assert model.fc.in_features == 4
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_convnet_widths_depths_and_flat_size():
    model = build_model({"name": "convnet", "depth": 2, "width": 16, "norm": "none"}, 5, 3, 28)
    assert len(model.blocks) == 2
    assert model.fc.in_features == 16 * 7 * 7
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())


def test_instance_norm_convnet_has_no_batchnorm():
    model = build_model({"name": "convnet", "norm": "instance"}, 10, 3, 32)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    assert all(m.num_groups == m.num_channels == 128 and m.affine for m in norms)


def test_resnet18_stems():
    cifar = build_model("resnet18", 10, 3, 32)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    imagenet = build_model({"name": "resnet18", "stem": "auto"}, 10, 1, 128)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.in_channels == 1
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    forced = build_model({"name": "resnet18", "stem": "imagenet"}, 10, 3, 32)
    assert forced.conv1.kernel_size == (7, 7)


def test_resnet_ap10_uses_average_pooling_and_instance_norm():
    model = build_model("resnet_ap10", 10, 3, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.MaxPool2d)) for m in model.modules())
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 6  # 3 blocks x (main + shortcut)
    batch = build_model({"name": "resnet_ap10", "norm": "batch"}, 10, 3, 32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    large = build_model("resnet_ap10", 10, 3, 128)
    assert large.stem[0].kernel_size == (7, 7)
    _, feats = large.forward_features(torch.randn(1, 3, 128, 128))
    assert feats["stage4"].shape == (1, 512)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("vgg11", 10, 3, 32)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_unknown_kwarg_is_named():
    with pytest.raises(ConfigError, match="widht"):
        build_model({"name": "convnet", "widht": 64}, 10, 3, 32)


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "resnet_ap10", "stem": "imagenet"},  # 16px cannot survive the ImageNet stem
        {"name": "resnet18", "pretrained": "IMAGENET9K"},
    ],
)
def test_bad_values_are_config_errors(cfg):
    # (a value outside a model option's choices fails when the config is composed: test_schemas)
    with pytest.raises(ConfigError, match=f"model\\.({'|'.join(k for k in cfg if k != 'name')})"):
        build_model(cfg, 10, 3, 16)


def test_dictconfig_is_accepted():
    cfg = OmegaConf.create({"name": "convnet", "depth": 1, "width": 4})
    assert len(build_model(cfg, 10, 3, 32).blocks) == 1


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that fails like a machine without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_pretrained_offline_is_config_error(offline_hub):
    with pytest.raises(ConfigError, match="pretrained") as err:
        build_model({"name": "resnet18", "pretrained": True}, 1000, 3, 224)
    message = str(err.value)
    assert str(offline_hub) in message and "resnet18-" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_pretrained_loads_from_local_cache(offline_hub):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(num_classes=1000)
    offline_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), offline_hub / Path(weights.url).name)
    model = build_model({"name": "resnet18", "pretrained": "IMAGENET1K_V1"}, 1000, 3, 64)
    assert model.conv1.kernel_size == (7, 7)  # auto stem follows the weights
    assert torch.equal(model.fc.weight, reference.fc.weight)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_corrupt_cached_weights_are_config_error(offline_hub):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    offline_hub.mkdir(parents=True)
    (offline_hub / Path(weights.url).name).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="pretrained=false"):
        build_model({"name": "resnet18", "pretrained": True}, 1000, 3, 224)


@pytest.mark.parametrize("num_classes,channels", [(10, 3), (1000, 1)])
def test_pretrained_needs_imagenet_shapes(offline_hub, num_classes, channels):
    with pytest.raises(ConfigError, match="pretrained=false"):
        build_model({"name": "resnet18", "pretrained": True}, num_classes, channels, 224)


def test_pretrained_with_cifar_stem_is_config_error():
    with pytest.raises(ConfigError, match="model.stem=imagenet"):
        build_model({"name": "resnet50", "stem": "cifar", "pretrained": True}, 1000, 3, 32)


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_conf_file_builds(path):
    _, cfg = student_config(path.stem)  # the preset, checked against its schema
    assert cfg["name"] in MODEL_NAMES
    model = build_model(cfg, 10, 3, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_expected_conf_files_exist():
    names = {p.stem for p in CONF_DIR.glob("*.yaml")}
    assert {"convnet", "convnet_in", "convnet6", "resnet18", "resnet_ap10", "resnet50"} <= names


def test_students_are_named_by_conf_model_presets():
    name, cfg = student_config("convnet6")
    assert (name, cfg) == ("convnet6", {"name": "convnet", "depth": 6, "width": 128, "norm": "instance"})
    model = build_model(cfg, 10, 3, 128)
    assert len(model.blocks) == 6 and model(torch.randn(1, 3, 128, 128)).shape == (1, 10)
    # a mapping overrides the preset's fields and keeps the preset's name
    name, cfg = student_config({"name": "convnet_in", "width": 8})
    assert (name, cfg) == ("convnet_in", {"name": "convnet", "depth": 3, "width": 8, "norm": "instance"})
    assert set(MODEL_NAMES) <= set(preset_names())  # every builder has a preset of its own name


@pytest.mark.parametrize("entry", ["nosuchnet", {"name": "vgg11"}, {"width": 8}])
def test_an_unknown_student_lists_the_presets(entry):
    with pytest.raises(ConfigError, match="evaluate.students.*convnet6.*resnet_ap10"):
        student_config(entry)


def test_a_model_config_leaves_its_defaults_to_its_preset_file():
    """conf/model/<name>.yaml is the one place a model's defaults live: the builders and ConvNet have none."""
    import inspect

    from ddist.models.convnet import ConvNet

    assert all(p.default is inspect.Parameter.empty for p in inspect.signature(ConvNet).parameters.values())
    model = build_model({"name": "convnet", "width": 8}, 10, 3, 32)  # depth and norm from conf/model/convnet.yaml
    assert len(model.blocks) == 3 and isinstance(model.blocks[0][1], torch.nn.BatchNorm2d)
