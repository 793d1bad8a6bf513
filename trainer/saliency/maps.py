"""From attributions to the int8 maps the store keeps: thresholding (:func:`to_ternary`,
:func:`to_binary_heatmap`) and :func:`compute_maps`, which runs a method over a batch in IEEE
float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from saliency_cache.errors import SatError
from saliency_cache.store import TARGET_RULES
from trainer.modules import module_mode
from trainer.saliency.methods import (
    SaliencyMethod,
    _above_fraction_of_max,
    _check_fraction,
    method_encoding,
)


# ---- thresholding --------------------------------------------------------------------------
def to_ternary(attr: torch.Tensor, quantile: float = 0.0) -> torch.Tensor:
    """Sign of an attribution, with small magnitudes zeroed.

    attr: float (B, C, H, W). Elements whose |attr| is below the per-image ``quantile`` of
    |attr| (over all C*H*W elements, linear interpolation) become 0; quantile 0 keeps every
    sign. Exact zeros stay 0. Returns int8 (B, C, H, W) in {-1, 0, +1}, on attr's device.
    """
    if (
        isinstance(quantile, bool)
        or not isinstance(quantile, (int, float))
        or not 0.0 <= quantile < 1.0
    ):
        raise SatError(f"quantile must be in [0, 1), got {quantile!r}")
    sign = torch.sign(attr).to(torch.int8)
    if quantile == 0.0:
        return sign
    mag = attr.detach().abs().flatten(1).float()
    cut = torch.quantile(mag, float(quantile), dim=1).reshape(-1, *([1] * (attr.ndim - 1)))
    return torch.where(attr.abs() < cut, torch.zeros_like(sign), sign)


def to_binary_heatmap(heat: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """+1 where heat / max(heat of its image) >= threshold, else -1.

    heat: float (B, 1, H, W) >= 0. An all-zero heatmap gives all -1. Returns int8 (B, 1, H, W)
    in {-1, +1}, on heat's device.
    """
    threshold = _check_fraction("heat threshold", threshold)
    above = _above_fraction_of_max(heat.detach(), threshold)
    return torch.where(above, 1, -1).to(torch.int8)


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full float32 convolutions and matrix products on CUDA for the block.

    cuDNN convolutions default to TF32 on Ampere and later GPUs (10-bit mantissa), enough to
    flip the sign of small gradient elements against a CPU run. Maps are computed once and
    shared, so precompute pays for IEEE float32. A no-op on other devices.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


class NonFiniteSaliencyError(SatError):
    """A teacher gave NaN or infinite logits or attributions; ``index`` is the first bad
    sample of the batch and ``what`` names the quantity. Thresholding would turn them into
    an all-zero (or all -1) map that looks valid, so :func:`compute_maps` refuses them."""

    def __init__(self, index: int, what: str) -> None:
        super().__init__(f"non-finite {what} for sample {index} of the batch")
        self.index, self.what = index, what

    def __reduce__(self):  # picklable across dask workers
        return (type(self), (self.index, self.what))


def _require_finite(t: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        raise NonFiniteSaliencyError(int((~finite).nonzero()[0, 0]), what)


def compute_maps(
    method: SaliencyMethod,
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    target_rule: str = "label",
    quantile: float = 0.0,
    heat_threshold: float = 0.5,
) -> tuple[np.ndarray, str]:
    """Saliency maps of a batch, thresholded for the store.

    x: float (B, C, H, W) in [0, 1]; labels: long (B,) ground truth. ``target_rule`` "label"
    explains the ground-truth class (the paper), "argmax" the model's prediction (the
    authors' code). ``quantile`` applies to gradient kinds (:func:`to_ternary`),
    ``heat_threshold`` to heatmaps (:func:`to_binary_heatmap`); boxes carry their own
    threshold in ``method.params``.

    Returns (int8 array (B, C, H, W) in {-1, 0, +1} with "ternary", or int8 (B, 1, H, W) in
    {-1, +1} with "binary"). Raises :class:`NonFiniteSaliencyError` on NaN or inf logits
    (``"argmax"``) or attributions.
    """
    if target_rule not in TARGET_RULES:
        raise SatError(
            f"unknown target rule {target_rule!r}; choose one of: {', '.join(TARGET_RULES)}"
        )
    labels = torch.as_tensor(labels, device=x.device).long().reshape(-1)
    with ieee_fp32(x.device):
        if target_rule == "argmax":
            with torch.no_grad(), module_mode(model, False):
                logits = model(x)
            _require_finite(logits, "logits")
            target = logits.argmax(dim=1)
        else:
            target = labels
        attr = method.attribute(model, x, target)
    _require_finite(attr, "attributions")
    if method.kind == "gradient":
        maps = to_ternary(attr, quantile)
    elif method.kind == "heatmap":
        maps = to_binary_heatmap(attr, heat_threshold)
    elif method.kind == "box":
        maps = torch.where(attr > 0, 1, -1).to(torch.int8)
    else:
        raise SatError(f"saliency method {method.name!r} has unknown kind {method.kind!r}")
    return maps.cpu().numpy(), method_encoding(method)
