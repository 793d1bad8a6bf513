"""Model registry: every architecture maps [0, 1] images to logits, rebuilds from ``model.arch``,
and has one distinct nn.ReLU module per non-linearity (what guided backprop needs)."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from saliency_cache.errors import SatError
from trainer.models import Normalize, create_model, list_models

ALL = list_models()


def _images(n, size, channels=3, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_has_the_papers_teachers():
    assert {"resnet10", "resnet34"} <= set(ALL)
    with pytest.raises(SatError, match="'resnet99'"):
        create_model("resnet99", 10, width=4)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [16, 32])
def test_logits_shape_and_range(name, size):
    torch.manual_seed(0)
    model = create_model(name, 7, width=4).eval()
    x = _images(3, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Different images give different logits (the network is not constant).
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_grows_with_width(name):
    def count(width):
        return sum(p.numel() for p in create_model(name, 10, width=width).parameters())

    assert count(4) < count(8) < count(16)


@pytest.mark.parametrize("name", ALL)
def test_every_relu_is_a_distinct_module_called_once(name):
    torch.manual_seed(0)
    model = create_model(name, 5, width=4).eval()
    # remove_duplicate=False lists a module once per place it is registered.
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert relus, "no nn.ReLU modules"
    assert len({id(m) for m in relus}) == len(relus)
    assert not any(m.inplace for m in relus)

    calls = {id(m): 0 for m in relus}
    handles = [
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
        for m in relus
    ]

    class CountRelu(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if "relu" in getattr(func, "__name__", ""):
                CountRelu.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), CountRelu():
        model(_images(2, 16))
    for h in handles:
        h.remove()
    assert set(calls.values()) == {1}
    # Every relu op in the forward pass came from one of those modules (no F.relu elsewhere).
    assert CountRelu.n == len(relus)


@pytest.mark.parametrize("name", ALL)
def test_arch_rebuilds_the_same_model(name):
    torch.manual_seed(0)
    model = create_model(name, 6, width=4, mean=(0.5, 0.4, 0.3), std=0.2).eval()
    arch = dict(model.arch)
    assert arch["name"] == name and arch["num_classes"] == 6 and arch["width"] == 4
    assert arch["mean"] == [0.5, 0.4, 0.3] and arch["std"] == [0.2, 0.2, 0.2]
    clone = create_model(arch.pop("name"), arch.pop("num_classes"), **arch).eval()
    clone.load_state_dict(model.state_dict())
    x = _images(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize("name", ALL)
def test_cam_layer_is_the_last_feature_map(name):
    torch.manual_seed(0)
    model = create_model(name, 5, width=4).eval()
    seen = []
    h = model.cam_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(_images(2, 32))
    h.remove()
    assert seen == [torch.Size([2, 32, 4, 4])]  # 8 * width channels, H / 8


def test_normalize_is_a_buffer_layer_inside_the_model():
    torch.manual_seed(0)
    model = create_model("resnet10", 3, width=4, in_channels=1, mean=0.5, std=0.25).eval()
    assert isinstance(model.normalize, Normalize)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("normalize") for n in names)
    assert "normalize.mean" in model.state_dict()
    x = _images(2, 8, channels=1)
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)
    with torch.no_grad():
        assert model(x).shape == (2, 3)  # 8x8 is the smallest input the strides allow


def test_default_normalisation_follows_channels():
    rgb = create_model("resnet10", 2, width=4)
    gray = create_model("resnet10", 2, width=4, in_channels=1)
    assert rgb.arch["mean"] == [0.485, 0.456, 0.406]
    assert gray.arch["mean"] == [0.5] and gray.arch["std"] == [0.25]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean": (0.5, 0.5)}, r"\[0.5, 0.5\]"),
        ({"std": 0.0}, r"\[0.0, 0.0, 0.0\]"),
        ({"width": 0}, "got 0"),
        ({"in_channels": 0}, "got 0"),
    ],
)
def test_bad_arguments_raise_sat_error(kwargs, match):
    with pytest.raises(SatError, match=match):
        create_model("resnet10", 10, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    model = create_model("resnet10", 4, width=4).to(torch.device("cuda")).eval()
    with torch.no_grad():
        assert model(_images(2, 16).cuda()).device.type == "cuda"
