"""Saliency for the precompute stage: a teacher's attributions and their int8 store maps.

:mod:`trainer.saliency.methods` holds one class per method (registered in ``SALIENCY``);
:mod:`trainer.saliency.maps` thresholds attributions into the maps the store keeps.
"""

from trainer.saliency.maps import compute_maps, ieee_fp32, to_binary_heatmap, to_ternary
from trainer.saliency.methods import (
    KINDS,
    SALIENCY,
    GradCam,
    GradCamPlusPlus,
    GradCamPlusPlusBox,
    Gradient,
    GuidedBackpropMethod,
    GuidedGradCamPlusPlus,
    IntegratedGradientsMethod,
    SaliencyMethod,
    SmoothGrad,
    box_from_heatmap,
    create_method,
    gradcampp_heatmap,
    gradcampp_weights,
    list_methods,
    map_channels,
    method_encoding,
)

__all__ = [
    "KINDS",
    "SALIENCY",
    "GradCam",
    "GradCamPlusPlus",
    "GradCamPlusPlusBox",
    "Gradient",
    "GuidedBackpropMethod",
    "GuidedGradCamPlusPlus",
    "IntegratedGradientsMethod",
    "SaliencyMethod",
    "SmoothGrad",
    "box_from_heatmap",
    "compute_maps",
    "create_method",
    "gradcampp_heatmap",
    "gradcampp_weights",
    "ieee_fp32",
    "list_methods",
    "map_channels",
    "method_encoding",
    "to_binary_heatmap",
    "to_ternary",
]
