"""What guided backprop and Grad-CAM need from a model, checked on a probe forward pass.

Guided backprop (:func:`trainer.saliency.methods.guided_backprop`, as captum's
``GuidedBackprop``) changes the backward pass of ``nn.ReLU`` modules only. Any other
activation (a functional ``F.relu`` in a ``forward``, a GELU or SiLU module) is passed back as
a plain gradient, so the "guided" map silently becomes something else. An in-place
``nn.ReLU`` is made out-of-place when the probe's logits stay bit-identical (they do unless a
``forward`` relies on the in-place side effect instead of the returned tensor).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _activation_functions() -> dict[Any, str]:
    """The torch callables that are activations (not gates such as sigmoid or softmax)."""
    fns = {
        F.relu: "relu", F.relu_: "relu_", torch.relu: "relu", torch.relu_: "relu_",
        torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu_", F.relu6: "relu6",
        F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu_", F.elu: "elu", F.selu: "selu",
        F.celu: "celu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.hardswish: "hardswish",
        F.softplus: "softplus", F.prelu: "prelu", F.rrelu: "rrelu", F.hardtanh: "hardtanh",
    }
    return {k: v for k, v in fns.items() if k is not None}


class _Spy(TorchFunctionMode):
    """Records activation calls made outside ``nn.ReLU`` modules, with the innermost module."""

    def __init__(self, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.stack = stack
        self.fns = _activation_functions()
        self.outside: list[tuple[str, str, str]] = []  # (function, module name, module type)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.fns.get(func)
        if name is not None and not any(isinstance(m, nn.ReLU) for _, m in self.stack):
            where, mod = self.stack[-1] if self.stack else ("", None)
            self.outside.append((name, where or "<top>", type(mod).__name__))
        return func(*args, **(kwargs or {}))


def _forward_spied(model: nn.Module, x: torch.Tensor, cam: str | None):
    """(logits, activation calls outside nn.ReLU, output shapes of the cam layer per call)."""
    stack: list[tuple[str, nn.Module]] = []
    cam_shapes: list[tuple[int, ...]] = []
    handles = []

    def enter(name: str, mod: nn.Module) -> None:  # hooks return None: inputs stay as they are
        stack.append((name, mod))

    def leave(*_: Any) -> None:
        stack.pop()

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, _i, name=name: enter(name, mod)))
        handles.append(m.register_forward_hook(leave))
    if cam is not None:
        target = model.net.get_submodule(cam) if hasattr(model, "net") else model.get_submodule(cam)
        handles.append(target.register_forward_hook(
            lambda _m, _i, out: cam_shapes.append(tuple(out.shape) if torch.is_tensor(out) else ())))
    spy = _Spy(stack)
    try:
        with torch.no_grad(), spy:
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, spy.outside, cam_shapes


def inspect_activations(model: nn.Module, image_shape, cam: str | None) -> dict[str, Any]:
    """Probe ``model`` (eval mode, CPU) with a seeded (2, *image_shape) batch in [0, 1].

    Makes in-place ``nn.ReLU`` modules out-of-place when that is exact (same logits, bit for
    bit), else puts them back. Returns ``gbp_problem`` (None, or why guided backprop would be
    wrong), ``cam_problem`` (None, or why ``cam`` cannot be explained: unnamed, not a 4-D
    feature map, or run other than once) and ``relu_made_out_of_place`` (how many modules).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, *[int(v) for v in image_shape]), generator=g)
    try:
        before, outside, cam_shapes = _forward_spied(model, x, cam)
    except RuntimeError as e:
        from saliency_cache.errors import SatError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SatError(f"the teacher does not run on {list(image_shape)} images: {first}") from None
    inplace = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    for m in inplace:
        m.inplace = False
    swapped = len(inplace)
    problem = None
    if inplace:
        after, _, _ = _forward_spied(model, x, cam)
        if not torch.equal(before, after):
            for m in inplace:
                m.inplace = True
            swapped = 0
            problem = (f"{len(inplace)} in-place nn.ReLU modules cannot be made out-of-place "
                       "without changing the logits")
    if outside:
        fn, where, kind = outside[0]
        kinds = sorted({f for f, _, _ in outside})
        problem = (f"{len(outside)} activation call(s) outside nn.ReLU modules "
                   f"({', '.join(kinds)}; the first is {fn} in {where!r}, a {kind})")
    if cam is None:
        cam_problem = "no cam layer named and no default for this model family"
    elif len(cam_shapes) != 1 or len(cam_shapes[0]) != 4:
        cam_problem = (f"cam layer {cam!r} gave outputs of shapes {cam_shapes} in one forward "
                       "pass; Grad-CAM needs one (B, K, h, w) feature map")
    else:
        cam_problem = None
    return {"gbp_problem": problem, "cam_problem": cam_problem, "relu_made_out_of_place": swapped}
