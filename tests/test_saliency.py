"""Saliency methods: hand-computed guided backprop and Grad-CAM(++), batch invariance over the
whole registry, thresholding into int8 maps, target rules, determinism."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency_cache.errors import SatError
from trainer.models import create_model
from trainer.saliency import (
    box_from_heatmap,
    compute_maps,
    create_method,
    gradcampp_weights,
    ieee_fp32,
    list_methods,
    map_channels,
    method_encoding,
    to_binary_heatmap,
    to_ternary,
)

ALL = list_methods()
# Few noise samples / steps keep the registry-wide tests fast; the defaults are tested apart.
FAST = {"smoothgrad": {"nt_samples": 4}, "ig": {"n_steps": 8}}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("resnet10", 5, width=4).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 16, 16, generator=g), torch.tensor([0, 3, 1])


# ---- hand-computed cases -------------------------------------------------------------------
class TwoLayer(nn.Module):
    """x -> Linear -> ReLU -> Linear, with fixed weights."""

    def __init__(self, w1, b1, w2):
        super().__init__()
        self.fc1 = nn.Linear(w1.shape[1], w1.shape[0])
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(w2.shape[1], w2.shape[0], bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(w1)
            self.fc1.bias.copy_(b1)
            self.fc2.weight.copy_(w2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def test_guided_backprop_matches_hand_computation():
    w1 = torch.tensor([[1.0, -2.0, 0.5, 1.0], [-1.0, 1.0, 1.0, 0.0], [2.0, 0.0, -1.0, 1.0]])
    b1 = torch.tensor([0.0, -3.0, 0.1])
    w2 = torch.tensor([[1.0, 2.0, -1.0], [-0.5, 1.0, 3.0]])
    model = TwoLayer(w1, b1, w2).double()
    x = torch.tensor([0.9, 0.1, 0.4, 0.7], dtype=torch.float64).reshape(1, 1, 2, 2)
    target = torch.tensor([0])

    z = w1.double().numpy() @ x.flatten().numpy() + b1.double().numpy()  # pre-activations
    up = w2.double().numpy()[0]  # d logit_0 / d relu output
    plain = w1.double().numpy().T @ (up * (z > 0))
    guided = w1.double().numpy().T @ (np.maximum(up, 0) * (z > 0))
    # The case exercises both rules: a unit with a negative gradient and a dead unit.
    assert (z > 0).tolist() == [True, False, True] and up[2] < 0

    gbp = create_method("gbp").attribute(model, x, target)
    grad = create_method("gradient").attribute(model, x, target)
    np.testing.assert_allclose(gbp.flatten().numpy(), guided, rtol=1e-12)
    np.testing.assert_allclose(grad.flatten().numpy(), plain, rtol=1e-12)
    assert not np.allclose(guided, plain)


def test_guided_backprop_differs_from_gradient_on_resnet(resnet, batch):
    x, y = batch
    gbp = create_method("gbp").attribute(resnet, x, y)
    grad = create_method("gradient").attribute(resnet, x, y)
    assert gbp.shape == grad.shape == x.shape
    assert (gbp != 0).any()
    # If the ReLU hooks did not fire (F.relu in the model), both would be identical.
    assert not torch.allclose(gbp, grad, atol=1e-6)
    assert (torch.sign(gbp) != torch.sign(grad)).float().mean() > 0.05


class _SharedRelu(nn.Module):
    """One ReLU module applied twice, and a ReLU output read by two consumers (a residual)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        b = self.relu(self.conv2(a) + a)
        return self.fc(b.mean(dim=(2, 3)))


@pytest.mark.parametrize("model_name", ["resnet10", "resnet34", "shared_relu", "relu_head"])
def test_guided_backprop_is_captums_bit_for_bit(model_name, resnet, batch):
    """``gbp`` clamps each ReLU output's gradient instead of captum's hooks (which clone every
    ReLU input and relu its input gradient); the maps must not change by a single bit."""
    from captum.attr import GuidedBackprop

    torch.manual_seed(2)
    model = {"resnet10": lambda: resnet,
             "resnet34": lambda: create_model("resnet34", 5, width=4).eval(),
             "shared_relu": lambda: _SharedRelu().eval(),
             "relu_head": lambda: _ReluHead().eval()}[model_name]()
    x, y = batch
    ours = create_method("gbp").attribute(model, x, y)
    with pytest.warns(UserWarning, match="backward hooks on ReLU"):
        ref = GuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=y)
    assert torch.equal(ours, ref.detach())
    assert not torch.equal(ours, create_method("gradient").attribute(model, x, y))
    # Nothing is left behind on the model: a second call gives the same bytes.
    assert torch.equal(create_method("gbp").attribute(model, x, y), ours)
    assert not any(m._forward_hooks for m in model.modules())


class QuadCam(nn.Module):
    """A = cam_layer(x) (identity or 2x2 average pooling); logit_c = 1/2 sum_kij V_ckij A_kij^2,
    so dlogit_c/dA = V_c * A in closed form."""

    def __init__(self, v, pool=False):
        super().__init__()
        self.cam_layer = nn.AvgPool2d(2) if pool else nn.Identity()
        self.register_buffer("v", v)

    def forward(self, x):
        a = self.cam_layer(x)
        return 0.5 * (a[:, None] ** 2 * self.v[None]).sum(dim=(2, 3, 4))


def _gradcampp_numpy(a, g):
    """Eq. 19 per sample: a, g (K, h, w) -> alpha, w (K,), heat (h, w)."""
    num = g**2
    denom = 2 * g**2 + (a * g**3).sum(axis=(1, 2), keepdims=True)
    alpha = np.zeros_like(num)
    ok = denom != 0
    alpha[ok] = num[ok] / denom[ok]
    w = (np.maximum(g, 0) * alpha).sum(axis=(1, 2))
    heat = np.maximum((w[:, None, None] * a).sum(axis=0), 0)
    return alpha, w, heat


def _quadcam_case(pool=False):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    v[:, 2] = 0.0  # a channel with zero gradient: alpha is 0/0 there, defined as 0
    size = 8 if pool else 4
    x = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64)
    return QuadCam(v, pool=pool), x, torch.tensor([1, 2])


def test_gradcampp_matches_eq19_by_hand():
    model, x, y = _quadcam_case()
    heat = create_method("gradcam++").attribute(model, x, y)
    assert heat.shape == (2, 1, 4, 4)
    for i in range(2):
        a = x[i].numpy()
        g = model.v[y[i]].numpy() * a
        alpha, w, ref = _gradcampp_numpy(a, g)
        t_alpha, t_w, t_heat = gradcampp_weights(
            torch.from_numpy(a)[None], torch.from_numpy(g)[None]
        )
        np.testing.assert_allclose(t_alpha[0].numpy(), alpha, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(t_w[0].numpy(), w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(t_heat[0, 0].numpy(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(heat[i, 0].numpy(), ref, rtol=1e-10, atol=1e-12)
        assert (t_alpha[0, 2] == 0).all() and t_w[0, 2] == 0
    assert heat.max() > 0


def test_gradcampp_upsamples_layer_heat_bilinearly():
    model, x, y = _quadcam_case(pool=True)
    heat = create_method("gradcam++").attribute(model, x, y)
    assert heat.shape == (2, 1, 8, 8) and (heat >= 0).all()
    a = F.avg_pool2d(x, 2)
    g = model.v[y] * a
    _, _, layer_heat = gradcampp_weights(a, g)
    ref = F.interpolate(layer_heat, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(heat, ref, rtol=1e-10, atol=1e-12)


def test_gradcam_matches_hand_computation():
    model, x, y = _quadcam_case()
    cam = create_method("gradcam").attribute(model, x, y)
    for i in range(2):
        a = x[i].numpy()
        g = model.v[y[i]].numpy() * a
        ref = np.maximum((g.mean(axis=(1, 2))[:, None, None] * a).sum(axis=0), 0)
        np.testing.assert_allclose(cam[i, 0].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_box_from_heatmap_by_hand():
    heat = torch.zeros(2, 1, 6, 6)
    heat[0, 0, 1, 2] = 1.0
    heat[0, 0, 4, 3] = 0.6  # above half the max: stretches the box down
    heat[0, 0, 5, 5] = 0.4  # below: ignored
    box = box_from_heatmap(heat, 0.5)
    expected = -torch.ones(6, 6)
    expected[1:5, 2:4] = 1.0
    assert torch.equal(box[0, 0], expected)
    assert torch.equal(box[1], -torch.ones(1, 6, 6))  # all-zero heatmap -> no box


def test_box_method_is_box_of_gradcampp(resnet, batch):
    x, y = batch
    heat = create_method("gradcam++").attribute(resnet, x, y)
    box = create_method("gradcam++-box", threshold=0.3).attribute(resnet, x, y)
    assert torch.equal(box, box_from_heatmap(heat, 0.3))
    assert set(box.unique().tolist()) <= {-1.0, 1.0} and (box == 1).any()


def test_guided_gradcampp_is_gbp_times_heatmap(resnet, batch):
    x, y = batch
    ggc = create_method("guided-gradcam++").attribute(resnet, x, y)
    gbp = create_method("gbp").attribute(resnet, x, y)
    heat = create_method("gradcam++").attribute(resnet, x, y)
    torch.testing.assert_close(ggc, gbp * heat)


class _ReluHead(nn.Module):
    """A conv 'cam layer' followed by a ReLU module: guided backprop changes the gradient
    that reaches the cam layer, so Guided Grad-CAM++ cannot reuse its guided pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.cam_layer = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4, 4))

    def forward(self, x):
        return self.head(self.cam_layer(x))


@pytest.mark.parametrize("model_name", ["resnet", "relu_head"])
def test_guided_gradcampp_one_pass_equals_the_two_pass_product(model_name, resnet, batch,
                                                               monkeypatch):
    """The fused method (one forward and backward when no ReLU follows the cam layer, as in
    the ResNets) gives the bytes of guided backprop times a separate Grad-CAM++ pass, and a
    model with a ReLU after its cam layer falls back to the second pass."""
    from trainer.saliency import methods

    model = resnet if model_name == "resnet" else _ReluHead().eval()
    x, y = batch
    passes = []
    plain = methods.gradcampp_heatmap
    monkeypatch.setattr(methods, "gradcampp_heatmap",
                        lambda *a: passes.append(1) or plain(*a))
    ggc = create_method("guided-gradcam++").attribute(model, x, y)
    assert len(passes) == (0 if model_name == "resnet" else 1)
    expected = create_method("gbp").attribute(model, x, y) * plain(model, x, y)
    assert torch.equal(ggc, expected)


def test_integrated_gradients_completeness(resnet, batch):
    """Attributions sum to f(x) - f(baseline) up to the quadrature error (ReLU kinks)."""
    x, y = batch

    def logit(inp):
        with torch.no_grad():
            return resnet(inp).gather(1, y[:, None])[:, 0]

    for baseline in (0.0, 0.5):
        ig = create_method("ig", n_steps=64, baseline=baseline).attribute(resnet, x, y)
        gap = logit(x) - logit(torch.full_like(x, baseline))
        torch.testing.assert_close(
            ig.sum(dim=(1, 2, 3)), gap, rtol=0.0, atol=0.1 * gap.abs().max().item()
        )


# ---- contract over the whole registry ------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_batched_equals_unbatched(name, resnet, batch):
    x, y = batch
    method = create_method(name, **FAST.get(name, {}))
    together = method.attribute(resnet, x, y)
    alone = torch.cat([method.attribute(resnet, x[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_shape_kind_and_side_effects(name, resnet, batch):
    x, y = batch
    method = create_method(name, **FAST.get(name, {}))
    assert method.name == name and method.kind in ("gradient", "heatmap", "box")
    resnet.train()
    resnet.layer2.eval()  # mixed modes must come back exactly
    rng = torch.get_rng_state()
    x_in = x.clone()
    try:
        out = method.attribute(resnet, x_in, y)
        modes = {n: m.training for n, m in resnet.named_modules()}
    finally:
        resnet.eval()
    assert modes[""] and not modes["layer2"] and modes["layer3"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert not x_in.requires_grad and torch.equal(x_in, x)
    assert all(p.grad is None for p in resnet.parameters())
    for m in resnet.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert not out.requires_grad and out.dtype == torch.float32 and torch.isfinite(out).all()
    channels = map_channels(method, 3)
    assert out.shape == (3, channels, 16, 16)
    if method.kind == "heatmap":
        assert (out >= 0).all() and (out > 0).any()
    if method.kind == "box":
        assert set(out.unique().tolist()) <= {-1.0, 1.0}

    maps, enc = compute_maps(method, resnet, x, y, quantile=0.5)
    assert enc == method_encoding(method)
    assert isinstance(maps, np.ndarray) and maps.dtype == np.int8 and maps.shape == out.shape
    if method.kind == "gradient":
        assert enc == "ternary" and set(np.unique(maps)) == {-1, 0, 1}
        np.testing.assert_array_equal(maps[maps != 0], np.sign(out.numpy())[maps != 0])
    else:
        assert enc == "binary" and set(np.unique(maps)) == {-1, 1}


def test_attribution_under_no_grad_context(resnet, batch):
    x, y = batch
    with torch.no_grad():
        for name in ("gbp", "gradcam++"):
            assert create_method(name).attribute(resnet, x, y).abs().sum() > 0


def test_target_rule_argmax_vs_label(resnet, batch):
    x, _ = batch
    with torch.no_grad():
        pred = resnet(x).argmax(dim=1)
    wrong = (pred + 1) % 5
    method = create_method("gbp")
    by_label, _ = compute_maps(method, resnet, x, wrong, target_rule="label")
    by_argmax, _ = compute_maps(method, resnet, x, wrong, target_rule="argmax")
    of_pred, _ = compute_maps(method, resnet, x, pred, target_rule="label")
    assert np.array_equal(by_argmax, of_pred)
    assert not np.array_equal(by_label, by_argmax)
    for i in range(3):
        assert not np.array_equal(by_label[i], by_argmax[i])
    with pytest.raises(SatError, match="'teacher'"):
        compute_maps(method, resnet, x, wrong, target_rule="teacher")


def test_smoothgrad_is_deterministic_for_a_seed(resnet, batch):
    x, y = batch
    a = create_method("smoothgrad", nt_samples=4, seed=7).attribute(resnet, x, y)
    b = create_method("smoothgrad", nt_samples=4, seed=7).attribute(resnet, x, y)
    c = create_method("smoothgrad", nt_samples=4, seed=8).attribute(resnet, x, y)
    plain = create_method("gradient").attribute(resnet, x, y)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, plain)
    # The global RNG stream neither feeds the noise nor is consumed by it.
    torch.manual_seed(123)
    d = create_method("smoothgrad", nt_samples=4, seed=7).attribute(resnet, x, y)
    assert torch.equal(a, d) and torch.equal(
        torch.get_rng_state(), torch.manual_seed(123).get_state()
    )


def test_smoothgrad_is_the_mean_gradient_over_its_noisy_copies(resnet, batch):
    x, y = batch
    method = create_method("smoothgrad", nt_samples=3, stdevs=0.2, seed=5)
    noise = method.noise(x)
    assert noise.shape == (3, 3, *x.shape[1:]) and noise.dtype == torch.float32
    assert 0.15 < noise.std().item() < 0.25
    grad = create_method("gradient")
    expected = torch.stack([
        torch.stack([grad.attribute(resnet, x[i : i + 1] + noise[i, k], y[i : i + 1])[0]
                     for k in range(3)]).mean(0)
        for i in range(3)
    ])
    torch.testing.assert_close(method.attribute(resnet, x, y), expected, rtol=1e-4, atol=1e-6)


def test_smoothgrad_does_not_depend_on_batching_or_pass_size(resnet, batch, monkeypatch):
    """An image's noise is a function of (seed, its bytes) alone, and the noisy copies of a
    batch share passes: neither the batch an image is in nor the pass size changes its map."""
    from trainer.saliency.methods import SmoothGrad

    x, y = batch
    method = create_method("smoothgrad", nt_samples=4, seed=7)
    swapped = method.attribute(resnet, x.flip(0), y.flip(0)).flip(0)
    whole, _ = compute_maps(method, resnet, x, y)
    monkeypatch.setattr(SmoothGrad, "_MAX_PASS_IMAGES", 4)  # one image (4 copies) per pass
    alone = torch.cat([method.attribute(resnet, x[i : i + 1], y[i : i + 1]) for i in range(3)])
    split, _ = compute_maps(method, resnet, x, y)
    torch.testing.assert_close(alone, swapped, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone, method.attribute(resnet, x, y), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(whole, split)
    assert not torch.equal(method.noise(x[:1]), method.noise(x[1:2]))  # images differ


# ---- thresholding --------------------------------------------------------------------------
def test_to_ternary_by_hand():
    attr = torch.tensor([[0.0, -0.1, 0.2, -0.3, 0.4], [5.0, -4.0, 3.0, -2.0, 1.0]]).reshape(
        2, 1, 1, 5
    )
    assert to_ternary(attr).flatten(1).tolist() == [[0, -1, 1, -1, 1], [1, -1, 1, -1, 1]]
    # Per-image 50 % quantile of |attr|: 0.2 for the first image, 3.0 for the second.
    t = to_ternary(attr, quantile=0.5)
    assert t.dtype == torch.int8 and t.shape == attr.shape
    assert t.flatten(1).tolist() == [[0, 0, 1, -1, 1], [1, -1, 1, 0, 0]]
    with pytest.raises(SatError, match="1.0"):
        to_ternary(attr, quantile=1.0)


def test_to_binary_heatmap_by_hand():
    heat = torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, 1.4, 0.0]])
    b = to_binary_heatmap(heat.reshape(3, 1, 2, 2), threshold=0.5)
    assert b.dtype == torch.int8 and b.shape == (3, 1, 2, 2)
    assert b.flatten(1).tolist() == [[-1, -1, 1, 1], [-1, -1, -1, -1], [1, 1, -1, -1]]
    with pytest.raises(SatError, match="0"):
        to_binary_heatmap(heat.reshape(3, 1, 2, 2), threshold=0)


def test_map_channels_and_encodings():
    assert map_channels(create_method("gbp"), 3) == 3
    assert map_channels(create_method("gradcam++"), 3) == 1
    assert method_encoding(create_method("ig")) == "ternary"
    assert method_encoding(create_method("gradcam")) == "binary"
    assert method_encoding(create_method("gradcam++-box")) == "binary"


# ---- registry and parameters ---------------------------------------------------------------
def test_registry_lists_every_paper_method():
    assert set(ALL) >= {
        "gradient",
        "gbp",
        "gradcam",
        "gradcam++",
        "gradcam++-box",
        "smoothgrad",
        "ig",
        "guided-gradcam++",
    }
    with pytest.raises(SatError, match="'deeplift'"):
        create_method("deeplift")


def test_method_params_defaults_and_validation():
    assert create_method("smoothgrad").params == {"nt_samples": 16, "stdevs": 0.15, "seed": 0}
    assert create_method("ig").params["n_steps"] == 32
    assert create_method("gradcam++-box").params == {"threshold": 0.5}
    # One dict can serve several methods: parameters of other methods are not recorded.
    assert create_method("gbp", n_steps=8).params == {}
    assert create_method("ig", n_steps=8, nt_samples=2).params["n_steps"] == 8
    with pytest.raises(SatError, match="n_stpes"):
        create_method("ig", n_stpes=8)
    with pytest.raises(SatError, match="0"):
        create_method("ig", n_steps=0)
    with pytest.raises(SatError, match="-0.1"):
        create_method("smoothgrad", stdevs=-0.1)
    with pytest.raises(SatError, match="1.5"):
        create_method("gradcam++-box", threshold=1.5)


def test_gradcam_needs_a_cam_layer():
    model = TwoLayer(torch.ones(2, 4), torch.zeros(2), torch.ones(3, 2))
    with pytest.raises(SatError, match="cam_layer"):
        create_method("gradcam++").attribute(model, torch.rand(1, 1, 2, 2), torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name, resnet, batch):
    x, y = batch
    method = create_method(name, **FAST.get(name, {}))
    cpu = method.attribute(resnet, x, y)
    model = create_model("resnet10", 5, width=4)
    model.load_state_dict(resnet.state_dict())
    dev = torch.device("cuda")
    with ieee_fp32(dev):  # as compute_maps runs it: no TF32
        gpu = method.attribute(model.to(dev).eval(), x.to(dev), y.to(dev))
    assert gpu.device.type == "cuda"
    # SmoothGrad draws its noise on the CPU, so it matches too.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-5)


def test_ieee_fp32_turns_tf32_off_on_cuda_only_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with ieee_fp32(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before
    with ieee_fp32(torch.device("cuda", 0)):  # a device object needs no GPU
        assert conv.fp32_precision == matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(RuntimeError), ieee_fp32(torch.device("cuda")):
        raise RuntimeError("a failing batch")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
