"""Teachers from timm and torchvision: a named architecture plus weights in a local safetensors file.

A teacher argument (``sat precompute --teacher``) that is not one of our checkpoints is either

- the short form ``<library>:<model>@<weights.safetensors>``, e.g.
  ``timm:resnet18@runs/r18.safetensors`` or ``torchvision:resnet18@r18.safetensors``; or
- a teacher file (``.json``, ``.yaml`` or ``.yml``) with the keys ``library``, ``model``,
  ``weights`` (relative to the file's folder) and optionally ``num_classes``, ``input_size``
  (``[C, H, W]``: images of another size are refused), ``mean`` and ``std`` (per channel, for
  [0, 1] inputs), ``cam_layer`` (dotted module name), ``mode`` (how it was trained:
  ``external`` by default, or ``standard`` / ``adversarial`` / ``sparse``), ``name`` (the
  arch part of the map names, default ``<library>-<model>``, to tell two sets of weights of
  one model apart) and ``kwargs`` (passed to the model constructor).

The model is built with random weights (never ``pretrained=True``: nothing is downloaded) and
the safetensors tensors are loaded into it (safetensors holds raw tensors, so nothing is
unpickled). ``num_classes`` defaults to the rows of the classifier's weight in the file;
``mean`` / ``std`` to the library's (timm: the model's default config; torchvision: ImageNet).
The normalisation is the first layer of the returned :class:`ExternalTeacher`, which takes
float (B, C, H, W) images in [0, 1] like our own models.

Guided backprop hooks ``nn.ReLU`` modules only. In-place ``nn.ReLU`` modules are
made out-of-place when a probe forward pass shows that this leaves the logits bit-identical;
an activation that is functional (``F.relu`` in ``forward``) or not a ReLU (GELU, SiLU, ...)
makes ``gbp`` and ``guided-gradcam++`` refused with the reason, since guided backprop would
silently pass plain gradients through it. Gates (sigmoid, softmax) are back-propagated as plain
gradients, as in guided backprop's definition. Grad-CAM methods explain ``--cam-layer``, the
teacher file's ``cam_layer`` or a per-family default (:func:`default_cam_layer`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency_cache.errors import SatError
from trainer.models import IMAGENET_MEAN, IMAGENET_STD, Normalize

LIBRARIES = ("timm", "torchvision")
MODES = ("external", "standard", "adversarial", "sparse")
GUIDED_METHODS = ("gbp", "guided-gradcam++")  # need every activation to be an nn.ReLU module
CAM_METHODS = ("gradcam", "gradcam++", "gradcam++-box", "guided-gradcam++")  # need a cam layer
_FILE_SUFFIXES = (".json", ".yaml", ".yml")
_FILE_KEYS = ("library", "model", "weights", "num_classes", "input_size", "mean", "std",
              "cam_layer", "mode", "name", "kwargs")
# torchvision families -> the module whose output Grad-CAM explains (the last feature map).
_TORCHVISION_CAM = (
    ("resnet", "layer4"), ("resnext", "layer4"), ("wide_resnet", "layer4"),
    ("vgg", "features"), ("alexnet", "features"), ("squeezenet", "features"),
    ("densenet", "features"), ("mobilenet", "features"), ("efficientnet", "features"),
    ("convnext", "features"), ("mnasnet", "layers"), ("regnet", "trunk_output"),
    ("shufflenet", "conv5"), ("googlenet", "inception5b"), ("inception", "Mixed_7c"),
)


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher argument names. ``weights`` is a resolved path; ``source`` the argument."""

    library: str
    model: str
    weights: str
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    cam_layer: str | None = None
    mode: str = "external"
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    name: str | None = None


def is_external(arg: str | Path) -> bool:
    """Whether a ``--teacher`` argument names a timm / torchvision teacher (not our checkpoint)."""
    s = str(arg)
    return s.startswith(tuple(f"{lib}:" for lib in LIBRARIES)) or s.lower().endswith(_FILE_SUFFIXES)


def parse_teacher(arg: str | Path) -> TeacherSpec:
    """The :class:`TeacherSpec` of a short form or a teacher file; SatError quoting ``arg``."""
    s = str(arg)
    if s.lower().endswith(_FILE_SUFFIXES):
        return _spec_from_file(s)
    lib, _, rest = s.partition(":")
    name, sep, weights = rest.partition("@")
    if lib not in LIBRARIES or not name or not sep or not weights:
        raise SatError(
            f"teacher {s!r}: expected <library>:<model>@<weights.safetensors> with library "
            f"{' or '.join(LIBRARIES)}, or a .json/.yaml teacher file"
        )
    return _checked(s, {"library": lib, "model": name, "weights": weights}, Path.cwd())


def _spec_from_file(path: str) -> TeacherSpec:
    p = Path(path)
    if not p.is_file():
        raise SatError(f"teacher file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else _strict_yaml(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SatError(f"teacher file {path}: cannot read it ({first})") from None
    if not isinstance(data, dict):
        raise SatError(f"teacher file {path}: expected a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FILE_KEYS))
    if unknown:
        raise SatError(f"teacher file {path}: unknown key(s) {unknown}; valid: {', '.join(_FILE_KEYS)}")
    for key in ("library", "model", "weights"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise SatError(f"teacher file {path}: {key!r} must be a non-empty string, got {data.get(key)!r}")
    return _checked(path, data, p.resolve().parent)


def _strict_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice (YAML would keep the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"key(s) {dup} given twice")
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ValueError(str(e).splitlines()[0]) from None


def _checked(source: str, d: dict[str, Any], base: Path) -> TeacherSpec:
    """Validate the fields of a teacher argument; relative weights are taken from ``base``."""
    def bad(key: str, want: str) -> SatError:
        return SatError(f"teacher {source!r}: {key} must be {want}, got {d[key]!r}")

    if d["library"] not in LIBRARIES:
        raise bad("library", " or ".join(LIBRARIES))
    weights = Path(d["weights"]).expanduser()
    weights = weights if weights.is_absolute() else base / weights
    if not weights.is_file():
        raise SatError(f"teacher {source!r}: weights file not found: {weights}")
    num_classes = d.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise bad("num_classes", "a positive integer")
    size = d.get("input_size")
    if size is not None:
        if isinstance(size, int) and not isinstance(size, bool):
            size = [3, size, size]
        if not (isinstance(size, list) and len(size) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise bad("input_size", "[C, H, W] of positive integers (or one H = W)")
        size = tuple(size)
    stats = {}
    for key in ("mean", "std"):
        v = d.get(key)
        if v is not None:
            v = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            if not (isinstance(v, list) and v and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise bad(key, "a number or a list of numbers")
            v = tuple(float(x) for x in v)
        stats[key] = v
    if stats["std"] is not None and min(stats["std"]) <= 0:
        raise bad("std", "positive")
    cam = d.get("cam_layer")
    if cam is not None and (not isinstance(cam, str) or not cam):
        raise bad("cam_layer", "a dotted module name")
    mode = d.get("mode", "external")
    if mode not in MODES:
        raise bad("mode", " | ".join(MODES))
    name = d.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise bad("name", "a non-empty string")
    kwargs = d.get("kwargs") or {}
    if not isinstance(kwargs, dict) or any(k in ("pretrained", "weights", "num_classes") for k in kwargs):
        raise bad("kwargs", "a mapping of constructor arguments (not pretrained/weights/num_classes)")
    return TeacherSpec(d["library"], d["model"], str(weights), num_classes, size, stats["mean"],
                       stats["std"], cam, mode, dict(kwargs), source, name)


# ---- building ------------------------------------------------------------------------------
class ExternalTeacher(nn.Module):
    """A library model behind its input normalisation.

    Input: float (B, C, H, W) in [0, 1]; output: the library model's logits (B, num_classes).
    ``cam_layer`` is the module named ``cam_layer_name`` inside ``net`` (None when unnamed).
    """

    def __init__(self, net: nn.Module, mean, std, cam_layer_name: str | None, arch: dict) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.cam_layer_name = cam_layer_name
        self.arch = arch

    @property
    def cam_layer(self) -> nn.Module | None:
        return None if self.cam_layer_name is None else self.net.get_submodule(self.cam_layer_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def library_version(library: str) -> str:
    """The library's ``__version__`` (with any local build tag, e.g. ``0.29.1+cu130``)."""
    try:
        return str(importlib.import_module(library).__version__)
    except ImportError:
        return "not installed"


def _construct(spec: TeacherSpec, num_classes: int | None) -> nn.Module:
    kw = dict(spec.kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    # The random initialisation is overwritten by the weights; fork the RNG so that building a
    # teacher leaves the caller's global torch RNG where it was.
    with torch.random.fork_rng(devices=[]):
        return _construct_unseeded(spec, kw)


def _construct_unseeded(spec: TeacherSpec, kw: dict[str, Any]) -> nn.Module:
    try:
        if spec.library == "timm":
            try:
                import timm
            except ImportError:
                raise SatError(
                    f"teacher {spec.source!r} needs timm: pip install 'sat-pipeline[timm]'"
                ) from None
            if not timm.is_model(spec.model):
                raise SatError(f"teacher {spec.source!r}: timm has no model {spec.model!r}")
            return timm.create_model(spec.model, pretrained=False, **kw)
        import torchvision

        if spec.model not in torchvision.models.list_models(module=torchvision.models):
            raise SatError(
                f"teacher {spec.source!r}: torchvision has no classification model {spec.model!r}"
            )
        return torchvision.models.get_model(spec.model, weights=None, **kw)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SatError(f"teacher {spec.source!r}: cannot build {spec.library} model {spec.model!r} "
                       f"with {kw}: {first}") from None


def _classifier_key(spec: TeacherSpec, net: nn.Module) -> str | None:
    """State-dict key of the classifier's weight (timm: ``get_classifier()``; torchvision:
    the last ``nn.Linear``), or None when there is none."""
    head = net.get_classifier() if spec.library == "timm" and hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return None
    return next((f"{n}.weight" for n, m in net.named_modules() if m is head), None)


def _read_weights(spec: TeacherSpec) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(spec.weights, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SatError(f"teacher {spec.source!r}: {spec.weights} is not a readable safetensors "
                       f"file ({str(e).strip().splitlines()[0] if str(e).strip() else e})") from None


def default_cam_layer(spec: TeacherSpec, net: nn.Module) -> str | None:
    """The last feature stage: timm's ``feature_info[-1]["module"]``, or the torchvision
    family's module from a fixed table; None when neither applies."""
    if spec.library == "timm":
        info = getattr(net, "feature_info", None)
        try:
            return str(info[-1]["module"]) if info else None
        except (KeyError, TypeError, IndexError):
            return None
    return next((layer for prefix, layer in _TORCHVISION_CAM if spec.model.startswith(prefix)), None)


def build_teacher(spec: TeacherSpec, *, image_shape, cam_layer: str | None = None
                  ) -> tuple[ExternalTeacher, dict[str, Any]]:
    """Build ``spec`` on the CPU in eval mode with its weights; return (model, facts).

    image_shape: (C, H, W) of the images the teacher will see; a probe batch of that shape
    (fixed seed) checks the in-place ReLU swap and finds the activations guided backprop
    cannot hook. cam_layer: overrides the file's and the family default when the spec has
    none. facts: ``num_classes``, ``mean``, ``std``, ``cam_layer`` (or None), ``cam_problem``
    and ``gbp_problem`` (None or why), ``relu_made_out_of_place`` (int).
    """
    state = _read_weights(spec)
    net = _construct(spec, spec.num_classes)
    num_classes = spec.num_classes
    if num_classes is None:
        key = _classifier_key(spec, net)
        if key is None or key not in state or state[key].ndim != 2:
            raise SatError(f"teacher {spec.source!r}: cannot tell num_classes from the weights "
                           "(no classifier weight found); give num_classes in a teacher file")
        num_classes = int(state[key].shape[0])
        if net.state_dict()[key].shape[0] != num_classes:
            net = _construct(spec, num_classes)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        raise SatError(f"teacher {spec.source!r}: {spec.weights} does not fit {spec.library} "
                       f"{spec.model!r}: {first} {lines[0] if lines else ''}".rstrip()) from None
    net.eval()
    mean, std = _stats(spec, net, int(image_shape[0]))
    cam = spec.cam_layer or cam_layer or default_cam_layer(spec, net)
    if cam is not None:
        try:
            net.get_submodule(cam)
        except AttributeError:
            raise SatError(f"teacher {spec.source!r}: cam layer {cam!r} is not a module of "
                           f"{spec.model!r}") from None
    model = ExternalTeacher(net, mean, std, cam, arch={
        "name": f"{spec.library}:{spec.model}", "num_classes": num_classes,
        "library": spec.library, "kwargs": spec.kwargs,
    }).eval()
    from trainer.activations import inspect_activations

    facts = inspect_activations(model, image_shape, cam)
    facts.update(num_classes=num_classes, mean=list(mean), std=list(std), cam_layer=cam)
    return model, facts


def _stats(spec: TeacherSpec, net: nn.Module, channels: int) -> tuple[list[float], list[float]]:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = spec.mean or tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = spec.std or tuple(cfg.get("std") or IMAGENET_STD)
    out = []
    for what, v in (("mean", mean), ("std", std)):
        v = list(v) * channels if len(v) == 1 else list(v)
        if len(v) != channels:
            raise SatError(f"teacher {spec.source!r}: {what} has {len(v)} values but the images "
                           f"have {channels} channels")
        out.append([float(x) for x in v])
    return out[0], out[1]


def weights_sha256(spec: TeacherSpec) -> str:
    from trainer.checkpoint import file_sha256

    return file_sha256(spec.weights)


def describe_external(arg: str, *, image_shape=None, methods=(), cam_layer: str | None = None
                      ) -> dict[str, Any]:
    """Provenance of a timm / torchvision teacher, after refusing what it cannot do.

    image_shape: (C, H, W) of the dataset's images (refused when the teacher file's
    ``input_size`` differs); methods: the saliency methods it will run (``gbp`` /
    ``guided-gradcam++`` refused on activations guided backprop cannot guide, Grad-CAM methods
    without a usable cam layer). The keys of :func:`pipelines.teacher.describe_teacher`
    come first (``teacher_arch`` is ``<library>-<model>``, so the map is named e.g.
    ``timm-resnet18-external-gbp``), then ``teacher_library``, ``teacher_library_version``,
    ``teacher_model``, ``teacher_weights``, ``teacher_mean``, ``teacher_std``,
    ``teacher_input_size``, ``teacher_cam_layer``, ``teacher_gbp`` ("exact" or the reason)
    and ``teacher_relu_made_out_of_place``.
    """
    spec = parse_teacher(arg)
    if image_shape is None:
        image_shape = spec.input_size or (3, 224, 224)
    if spec.input_size is not None and tuple(image_shape) != spec.input_size:
        raise SatError(f"teacher {arg!r} takes {list(spec.input_size)} inputs but the images are "
                       f"{list(image_shape)}")
    _, facts = build_teacher(spec, image_shape=image_shape, cam_layer=cam_layer)
    for m in methods:
        if m in GUIDED_METHODS and facts["gbp_problem"]:
            raise SatError(f"teacher {arg!r}: {m} needs every activation to be an nn.ReLU module "
                           f"({facts['gbp_problem']}); guided backprop would pass plain "
                           "gradients through it. Use gradient, smoothgrad, ig or gradcam++ "
                           "with this teacher")
        if m in CAM_METHODS and facts["cam_problem"]:
            raise SatError(f"teacher {arg!r}: {m} needs a cam layer ({facts['cam_problem']}); "
                           "name one with --cam-layer or cam_layer in a teacher file")
    sha = weights_sha256(spec)
    return {
        "teacher_arch": spec.name or f"{spec.library}-{spec.model}",
        "teacher_width": None,
        "teacher_mode": spec.mode,
        "checkpoint_sha256": sha,
        "teacher_num_classes": facts["num_classes"],
        "teacher_fingerprint": None,
        "teacher_library": spec.library,
        "teacher_library_version": library_version(spec.library),
        "teacher_model": spec.model,
        "teacher_weights": spec.weights,
        "teacher_spec": {k: v for k, v in asdict(spec).items() if k != "source"},
        "teacher_mean": facts["mean"],
        "teacher_std": facts["std"],
        "teacher_input_size": list(spec.input_size) if spec.input_size else None,
        "teacher_cam_layer": None if facts["cam_problem"] else facts["cam_layer"],
        "teacher_gbp": facts["gbp_problem"] or "exact",
        "teacher_relu_made_out_of_place": facts["relu_made_out_of_place"],
    }


def load_external(arg: str, device: torch.device | str, *, sha256: str | None = None,
                  image_shape=None, cam_layer: str | None = None) -> ExternalTeacher:
    """The teacher of ``arg`` on ``device`` (eval mode), built exactly as
    :func:`describe_external` described it; refuses weights whose sha256 changed since."""
    spec = parse_teacher(arg)
    if sha256 is not None:
        actual = weights_sha256(spec)
        if actual != sha256:
            raise SatError(f"teacher weights {spec.weights} changed since precompute planned its "
                           f"maps (sha256 {actual[:12]}..., recorded {sha256[:12]}...); run "
                           "precompute again")
    model, _ = build_teacher(spec, image_shape=image_shape or spec.input_size or (3, 224, 224),
                             cam_layer=cam_layer)
    return model.to(device).eval()


def list_teacher_sources() -> list[str]:
    """Lines for ``sat list models``: how to name timm / torchvision teachers, and whether
    each library is installed here (timm is the ``sat-pipeline[timm]`` extra)."""
    out = []
    for lib in LIBRARIES:
        version = library_version(lib)
        state = "not installed: pip install 'sat-pipeline[timm]'" if version == "not installed" \
            else f"{lib} {version}"
        out.append(f"{lib}:<model>@<weights.safetensors>  (teacher for precompute; {state})")
    return out
