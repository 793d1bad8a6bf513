"""Saliency methods of a teacher, one class per method, registered by name in :data:`SALIENCY`.

captum does the work wherever it has the method, except guided backprop, whose captum
hooks cost a copy of every ReLU input (:func:`guided_backprop` gives its values at a plain
backward's cost). Every method's :meth:`SaliencyMethod.attribute` takes

- ``model``: a classifier taking float (B, C, H, W) images in [0, 1] (normalisation inside);
  Grad-CAM variants also need ``model.cam_layer``, the module whose output they explain;
- ``x``: float (B, C, H, W) in [0, 1];
- ``target``: long (B,), the class whose logit is explained, per sample;

and returns a float tensor of one of three kinds:

- ``"gradient"``: (B, C, H, W), signed attribution (stored as a ternary sign map);
- ``"heatmap"``: (B, 1, H, W), non-negative (stored as a binary map after a threshold);
- ``"box"``: (B, 1, H, W), already +1 inside a box and -1 outside (stored as binary).

Attributions are computed in eval mode (batch-norm running statistics), so each sample's
result does not depend on the rest of its batch; the modules' train/eval flags are restored
afterwards. Gradients are taken with ``torch.autograd.grad`` w.r.t. the input or a layer
output only, so nothing accumulates in the parameters' ``.grad``, and every hook is removed.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import (
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from torch import nn

from saliency_cache.errors import SatError
from trainer.modules import module_mode
from trainer.registry import Registry

SALIENCY: Registry = Registry("saliency method")

KINDS = ("gradient", "heatmap", "box")


# ---- helpers -------------------------------------------------------------------------------
def _cam_layer(model: nn.Module) -> nn.Module:
    layer = getattr(model, "cam_layer", None)
    if not isinstance(layer, nn.Module):
        raise SatError(
            f"model {type(model).__name__} has no 'cam_layer' module; Grad-CAM methods need one"
        )
    return layer


def _upsample(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, 1, h, w) to (B, 1, *size); keeps non-negative maps non-negative."""
    if tuple(heat.shape[-2:]) == tuple(size):
        return heat
    return LayerAttribution.interpolate(heat, size, interpolate_mode="bilinear")


def gradcampp_weights(
    activations: torch.Tensor, grads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM++ as in Eq. 19 of the SAT paper, from a layer's activations and gradients.

    activations A, grads g = dPhi^c/dA: float (B, K, h, w), where Phi^c is the target logit.

    - alpha_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab g_kab^3)
    - w_k = sum_ij relu(g_kij) alpha_kij
    - heat = relu(sum_k w_k A_k)

    Where the denominator is zero (in particular 0/0, where g vanishes on a dead channel)
    alpha is defined as 0, so the channel contributes nothing instead of NaN.

    Grad-CAM++'s derivation (Chattopadhyay et al., 2018) applies the formula to exp(score),
    whose higher derivatives are powers of the first; the paper's Eq. 19 writes it with the
    gradients of the logit itself, and that is what is computed here (the authors' code used
    a different denominator).

    Returns (alpha float (B, K, h, w), weights float (B, K), heat float (B, 1, h, w) >= 0).
    """
    g2 = grads.pow(2)
    spatial_sum = (activations * grads.pow(3)).sum(dim=(2, 3), keepdim=True)
    denom = 2.0 * g2 + spatial_sum
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)
    weights = (F.relu(grads) * alpha).sum(dim=(2, 3))
    heat = F.relu((weights[:, :, None, None] * activations).sum(dim=1, keepdim=True))
    return alpha, weights, heat


def gradcampp_heatmap(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ heatmap of ``model.cam_layer``, bilinearly upsampled to the input size.

    x: float (B, C, H, W) in [0, 1]; target: long (B,). Returns float (B, 1, H, W) >= 0.
    The model must already be in the mode it should be explained in (eval).
    """
    layer = _cam_layer(model)
    captured: list[torch.Tensor] = []

    def keep_output(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        captured.append(out)

    handle = layer.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            # The input is a leaf that requires grad, so the layer output is on the graph
            # even when the teacher's parameters are frozen.
            xin = x.detach().requires_grad_(True)
            logits = model(xin)
            if len(captured) != 1:
                raise SatError(
                    f"cam_layer ran {len(captured)} times in one forward pass; expected once"
                )
            acts = captured[0]
            score = logits.gather(1, target[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    _, _, heat = gradcampp_weights(acts.detach(), grads.detach())
    return _upsample(heat, tuple(x.shape[-2:]))


def _clamp_negative(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp_min(0)


def guided_backprop(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, cam_layer: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]:
    """Guided backprop of the target logit w.r.t. ``x``, optionally with the plain gradient at
    ``cam_layer``'s output from the same forward and backward pass.

    x: float (B, C, H, W), a leaf that requires grad; target: long (B,). Through every
    ``nn.ReLU`` module only positive gradients pass back, and only into positive inputs:
    the gradient of each ReLU's output is clamped at 0 before the ReLU's own backward
    masks it. That is captum's ``GuidedBackprop`` value for value (it applies relu to the
    ReLU's input gradient instead, which is the same number: relu(g * [x > 0]) =
    relu(g) * [x > 0]), without its clone of every ReLU input and per-module hooks: a plain
    forward/backward plus one clamp per ReLU output (tested bit for bit against captum).

    The clamp hooks are registered after the forward pass, the ``cam_layer`` capture first,
    so the captured gradient is the one arriving at that layer's output before any clamp
    of a ReLU that produced it (a block's output is its last ReLU's output tensor).

    Returns (guided gradient float (B, C, H, W), cam activations float (B, K, h, w) or None,
    their plain gradient or None, whether a ReLU module ran after ``cam_layer``: its clamp
    then reaches the captured gradient, which is no longer the plain one).
    """
    relu_outputs: list[torch.Tensor] = []
    acts: list[torch.Tensor] = []
    relu_after = False

    def keep_relu(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal relu_after
        relu_outputs.append(out)
        relu_after = relu_after or bool(acts)

    def keep_cam(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        acts.append(out)

    handles = [m.register_forward_hook(keep_relu)
               for m in model.modules() if isinstance(m, nn.ReLU)]
    if cam_layer is not None:
        handles.append(cam_layer.register_forward_hook(keep_cam))
    grads: list[torch.Tensor] = []
    try:
        with torch.enable_grad():
            score = model(x).gather(1, target[:, None]).sum()
            if cam_layer is not None and len(acts) == 1 and acts[0].requires_grad:
                acts[0].register_hook(grads.append)
            for out in relu_outputs:
                if out.requires_grad:
                    out.register_hook(_clamp_negative)
            (guided,) = torch.autograd.grad(score, x)
    finally:
        for h in handles:
            h.remove()
    if cam_layer is None or len(acts) != 1 or len(grads) != 1:
        return guided, None, None, relu_after
    return guided, acts[0].detach(), grads[0].detach(), relu_after


def box_from_heatmap(heat: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Bounding box of a heatmap's hot region as a +-1 map.

    heat: float (B, 1, H, W) >= 0. The box is the smallest one (edges inclusive) holding every
    pixel with heat / max(heat of its image) >= ``threshold``. Returns float (B, 1, H, W):
    +1 inside the box, -1 outside; all -1 for an all-zero heatmap.
    """
    threshold = _check_fraction("box threshold", threshold)
    above = _above_fraction_of_max(heat, threshold)[:, 0]  # (B, H, W) bool
    _, h, w = above.shape
    rows, cols = above.any(dim=2), above.any(dim=1)  # (B, H), (B, W)
    r_idx = torch.arange(h, device=heat.device)
    c_idx = torch.arange(w, device=heat.device)
    big = max(h, w)
    r0 = torch.where(rows, r_idx, big).amin(dim=1)
    r1 = torch.where(rows, r_idx, -1).amax(dim=1)
    c0 = torch.where(cols, c_idx, big).amin(dim=1)
    c1 = torch.where(cols, c_idx, -1).amax(dim=1)
    in_r = (r_idx[None] >= r0[:, None]) & (r_idx[None] <= r1[:, None])  # (B, H)
    in_c = (c_idx[None] >= c0[:, None]) & (c_idx[None] <= c1[:, None])  # (B, W)
    inside = in_r[:, :, None] & in_c[:, None, :]
    return torch.where(inside, 1.0, -1.0).to(heat.dtype)[:, None]


def _above_fraction_of_max(heat: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of heat / max(heat per image) >= threshold; all False where the max is 0."""
    peak = heat.amax(dim=(1, 2, 3), keepdim=True)
    positive = peak > 0
    ratio = heat / torch.where(positive, peak, torch.ones_like(peak))
    return positive & (ratio >= threshold)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SatError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise SatError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


# ---- methods -------------------------------------------------------------------------------
class SaliencyMethod:
    """Base class: ``name``, ``kind``, ``params`` and :meth:`attribute`.

    Subclasses declare ``DEFAULTS`` (every parameter and its default; the resolved values end
    up in ``params``, recorded as provenance) and implement ``_attribute``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "gradient"
    # Bumped when a method's algorithm changes the bytes of its maps; versions above 1 are
    # recorded in map provenance as ``method_version`` (see SmoothGrad).
    version: ClassVar[int] = 1
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.DEFAULTS))
        if unknown:
            raise SatError(
                f"saliency method {self.name!r} has no parameter(s) {unknown}; "
                f"it takes: {sorted(self.DEFAULTS) or 'none'}"
            )
        self.params: dict[str, Any] = {**self.DEFAULTS, **params}
        self._validate()

    def _validate(self) -> None:
        """Check ``self.params``; raise SatError quoting a bad value."""

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Attribution of ``target``'s logit for each image.

        x: float (B, C, H, W) in [0, 1]; target: long (B,) class indices (on any device).
        Returns a detached float tensor on x's device: (B, C, H, W) for kind "gradient",
        (B, 1, H, W) for "heatmap" (>= 0) and "box" (values +-1).
        """
        if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
            raise SatError(
                f"images must be a float (B, C, H, W) tensor, got "
                f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
            )
        target = torch.as_tensor(target, device=x.device).long().reshape(-1)
        if target.shape[0] != x.shape[0]:
            raise SatError(f"{x.shape[0]} images but {target.shape[0]} targets")
        # A fresh leaf that requires grad: captum differentiates w.r.t. it, and the caller's
        # tensor keeps its own requires_grad flag.
        xin = x.detach().requires_grad_(True)
        with module_mode(model, False):
            out = self._attribute(model, xin, target)
        return out.detach()

    def _attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


@SALIENCY.register("gradient")
class Gradient(SaliencyMethod):
    """Plain gradient of the target logit w.r.t. the input (captum ``Saliency(abs=False)``)."""

    name = "gradient"
    kind = "gradient"

    def _attribute(self, model, x, target):
        return Saliency(model).attribute(x, target=target, abs=False)


@SALIENCY.register("gbp")
class GuidedBackpropMethod(SaliencyMethod):
    """Guided backprop (Springenberg et al.): through every ``nn.ReLU`` only positive
    gradients flowing into positive inputs pass back (:func:`guided_backprop`, the same
    values as captum's ``GuidedBackprop`` at a plain backward's cost).

    ReLUs applied with ``F.relu`` are invisible to it; the models in ``trainer.models`` use
    one ``nn.ReLU`` module per non-linearity.
    """

    name = "gbp"
    kind = "gradient"

    def _attribute(self, model, x, target):
        return guided_backprop(model, x, target)[0]


@SALIENCY.register("gradcam")
class GradCam(SaliencyMethod):
    """Grad-CAM of ``model.cam_layer`` (captum ``LayerGradCam``), ReLU'd and upsampled
    bilinearly to the input size. Returns (B, 1, H, W) >= 0."""

    name = "gradcam"
    kind = "heatmap"

    def _attribute(self, model, x, target):
        cam = LayerGradCam(model, _cam_layer(model)).attribute(
            x, target=target, relu_attributions=True
        )
        return _upsample(cam, tuple(x.shape[-2:]))


@SALIENCY.register("gradcam++")
class GradCamPlusPlus(SaliencyMethod):
    """Grad-CAM++ of ``model.cam_layer`` per the paper's Eq. 19 (see :func:`gradcampp_weights`),
    upsampled bilinearly to the input size. Returns (B, 1, H, W) >= 0."""

    name = "gradcam++"
    kind = "heatmap"

    def _attribute(self, model, x, target):
        return gradcampp_heatmap(model, x, target)


@SALIENCY.register("gradcam++-box")
class GradCamPlusPlusBox(SaliencyMethod):
    """The paper's weak map from Grad-CAM++: the bounding box of every pixel whose heat is at
    least ``threshold`` of the image's maximum, +1 inside (inclusive) and -1 outside.

    Returns (B, 1, H, W) float with values +-1 (all -1 when the heatmap is all zero).
    """

    name = "gradcam++-box"
    kind = "box"
    DEFAULTS = {"threshold": 0.5}  # fraction of the per-image maximum heat

    def _validate(self):
        self.params["threshold"] = _check_fraction("threshold", self.params["threshold"])

    def _attribute(self, model, x, target):
        return box_from_heatmap(gradcampp_heatmap(model, x, target), self.params["threshold"])


def _sample_seed(seed: int, image: torch.Tensor) -> int:
    """A 63-bit seed from (seed, image bytes): the noise an image gets does not depend on the
    batch it is in or its position there, yet differs between images."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


@SALIENCY.register("smoothgrad")
class SmoothGrad(SaliencyMethod):
    """SmoothGrad (Smilkov et al.): the gradient of the target logit averaged over
    ``nt_samples`` copies of the image with N(0, stdevs^2) noise added in [0, 1] pixel space
    (what captum's ``NoiseTunnel`` over ``Saliency(abs=False)`` computes). Returns signed
    (B, C, H, W).

    Each image's noise comes from its own CPU generator seeded by (``seed``, the image's
    bytes), so a map does not depend on the batch the image is in, its position there or the
    device, and the global RNG is never touched. The noisy copies of a whole batch are then
    stacked and differentiated together, at most ``_MAX_PASS_IMAGES`` images per
    forward/backward pass on an accelerator (``_CPU_PASS_IMAGES`` on a CPU, where smaller
    passes are faster per image): one image at a time, a pass saw only ``nt_samples``
    images, which leaves a GPU mostly idle. How the copies are grouped into passes does not
    change the map (tested), so it is not part of the version.

    ``version`` 2 is this algorithm; version 1 (maps written before it) drew each image's
    noise from the global RNG inside ``fork_rng`` and ran captum one image at a time. The
    two give different noise, hence different bytes; the version is recorded in the map's
    provenance (``method_version``), so a resume refuses to mix them, and version-1 maps
    stay readable like any other.
    """

    name = "smoothgrad"
    kind = "gradient"
    version = 2
    DEFAULTS = {
        "nt_samples": 16,  # noisy copies per image
        "stdevs": 0.15,  # noise standard deviation, as a fraction of the [0, 1] input range
        "seed": 0,
    }
    # Noisy images per forward/backward pass on an accelerator: bounds activation memory
    # (about 0.4 GB for a width-64 ResNet-10 at 32x32), yet fills a GPU far better than
    # nt_samples images. On a CPU large passes are slower per image (a ResNet-10 of width 32
    # at 32x32, one thread: 3-4x slower per image at 1,024 than at 64, its activations no
    # longer fit in cache), so passes there hold at most _CPU_PASS_IMAGES.
    _MAX_PASS_IMAGES = 1024
    _CPU_PASS_IMAGES = 64

    def _validate(self):
        p = self.params
        p["nt_samples"] = _check_positive_int("nt_samples", p["nt_samples"])
        s = p["stdevs"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise SatError(f"stdevs must be a number > 0, got {s!r}")
        p["stdevs"] = float(s)
        if isinstance(p["seed"], bool) or not isinstance(p["seed"], (int, np.integer)):
            raise SatError(f"seed must be an integer, got {p['seed']!r}")
        p["seed"] = int(p["seed"])

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """The noise each image gets: float32 (B, nt_samples, C, H, W) on the CPU, drawn
        image by image from a generator seeded by (seed, that image's bytes)."""
        n, shape = self.params["nt_samples"], tuple(x.shape[1:])
        out = torch.empty((x.shape[0], n, *shape), dtype=torch.float32)
        for i in range(x.shape[0]):
            gen = torch.Generator().manual_seed(_sample_seed(self.params["seed"], x[i]))
            torch.randn((n, *shape), generator=gen, out=out[i])
        return out.mul_(self.params["stdevs"])

    def _attribute(self, model, x, target):
        n = self.params["nt_samples"]
        noise = self.noise(x).to(device=x.device, dtype=x.dtype)
        cap = self._MAX_PASS_IMAGES
        if x.device.type == "cpu":
            cap = min(cap, self._CPU_PASS_IMAGES)
        per_pass = max(1, cap // n)  # whole images per pass
        out = []
        for s in range(0, x.shape[0], per_pass):
            xs = x[s : s + per_pass].detach()
            noisy = (xs.unsqueeze(1) + noise[s : s + per_pass]).flatten(0, 1).requires_grad_(True)
            t = target[s : s + per_pass].repeat_interleave(n)
            logit = model(noisy).gather(1, t[:, None]).sum()
            (grad,) = torch.autograd.grad(logit, noisy)
            out.append(grad.unflatten(0, (xs.shape[0], n)).mean(dim=1))
        return torch.cat(out)


@SALIENCY.register("ig")
class IntegratedGradientsMethod(SaliencyMethod):
    """Integrated gradients (Sundararajan et al.) from a constant baseline image (captum
    ``IntegratedGradients``). Returns signed (B, C, H, W)."""

    name = "ig"
    kind = "gradient"
    DEFAULTS = {
        "n_steps": 32,  # points on the path from the baseline to the image
        "baseline": 0.0,  # pixel value of the baseline image (0 = black)
        "integration": "gausslegendre",  # captum's quadrature rule
    }
    _RULES = (
        "gausslegendre",
        "riemann_trapezoid",
        "riemann_left",
        "riemann_right",
        "riemann_middle",
    )
    # Images (samples x steps) per forward pass: bounds memory for large batches. On a CPU
    # passes of about 64 images are the fastest per image (see SmoothGrad), so there the
    # pass holds the batch, or as many whole steps of a small batch as fit in 64 images.
    _MAX_INTERNAL_BATCH = 512
    _CPU_INTERNAL_BATCH = 64

    def _validate(self):
        p = self.params
        p["n_steps"] = _check_positive_int("n_steps", p["n_steps"])
        b = p["baseline"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0:
            raise SatError(f"baseline must be a pixel value in [0, 1], got {b!r}")
        p["baseline"] = float(b)
        if p["integration"] not in self._RULES:
            raise SatError(
                f"unknown integration rule {p['integration']!r}; choose one of: {', '.join(self._RULES)}"
            )

    def _internal_batch(self, x: torch.Tensor) -> int:
        """Images per pass for a batch ``x``: a multiple of its size (captum splits the path
        into whole steps of the batch)."""
        b = x.shape[0]
        if x.device.type == "cpu":
            return b * max(1, self._CPU_INTERNAL_BATCH // b)
        return max(2 * b, self._MAX_INTERNAL_BATCH)

    def _attribute(self, model, x, target):
        return IntegratedGradients(model).attribute(
            x,
            baselines=self.params["baseline"],
            target=target,
            n_steps=self.params["n_steps"],
            method=self.params["integration"],
            internal_batch_size=self._internal_batch(x),
        )


@SALIENCY.register("guided-gradcam++")
class GuidedGradCamPlusPlus(SaliencyMethod):
    """Guided Grad-CAM++: guided backprop times the upsampled Grad-CAM++ heatmap (broadcast
    over channels). Returns signed (B, C, H, W)."""

    name = "guided-gradcam++"
    kind = "gradient"

    def _attribute(self, model, x, target):
        # One forward and one backward serve both factors: the guided backward passes the
        # cam layer's output on its way to the input, and the gradient there is the plain one
        # Grad-CAM++ needs as long as no ReLU module runs after that layer (guided backprop
        # changes the backward of ReLU modules only). Otherwise a second, plain pass is run.
        guided, acts, grads, relu_after = guided_backprop(model, x, target, _cam_layer(model))
        if acts is not None and not relu_after:
            _, _, heat = gradcampp_weights(acts, grads)
            return guided * _upsample(heat, tuple(x.shape[-2:]))
        return guided * gradcampp_heatmap(model, x, target)


# ---- registry access -----------------------------------------------------------------------
def list_methods() -> list[str]:
    """Names accepted by :func:`create_method`, sorted."""
    return SALIENCY.names()


def create_method(name: str, **params: Any) -> SaliencyMethod:
    """Instantiate a registered saliency method.

    Parameters that belong to *another* registered method are dropped, so one parameter dict
    (a stage config's ``method_params``) can serve several methods; ``method.params`` records
    only what the method used. A parameter no method takes raises SatError (a typo), as does
    a bad value.
    """
    cls = SALIENCY.get(name)
    known_elsewhere = {k for n in SALIENCY.names() for k in SALIENCY.get(n).DEFAULTS}
    typos = sorted(set(params) - known_elsewhere)
    if typos:
        raise SatError(
            f"unknown saliency parameter(s) {typos}; {name!r} takes: {sorted(cls.DEFAULTS) or 'none'}"
        )
    return cls(**{k: v for k, v in params.items() if k in cls.DEFAULTS})


def method_encoding(method: SaliencyMethod) -> str:
    """Store encoding of a method's maps: "ternary" for gradients, "binary" for heatmaps/boxes."""
    return "ternary" if method.kind == "gradient" else "binary"


def map_channels(method: SaliencyMethod, in_channels: int) -> int:
    """Channels of a stored map: the image's for gradient kinds, 1 for heatmaps and boxes."""
    return int(in_channels) if method.kind == "gradient" else 1

