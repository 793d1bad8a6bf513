"""Teachers from timm and torchvision (``--teacher timm:resnet18@w.safetensors`` or a teacher
file): random-init models saved to safetensors here, then used by precompute.

What a user relies on: the stored GBP map is captum's GuidedBackprop on that model in [0, 1]
pixel space (normalisation inside), and captum's result there is a real guided backprop;
provenance records the library, its version and the weights' sha256; in-place ReLUs are made
out-of-place only where exact, and GELU / functional activations refuse gbp with the reason.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from pipelines.cli import main
from pipelines.common import DataSpec
from pipelines.precompute import PrecomputeConfig, run
from pipelines.teacher import describe_teacher
from saliency_cache.errors import SatError
from saliency_cache.store import SaliencyStore
from tests.helpers import one_line_error
from trainer.activations import inspect_activations
from trainer.checkpoint import file_sha256
from trainer.models import IMAGENET_MEAN, IMAGENET_STD, Normalize
from trainer.teachers import load_external, parse_teacher

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

N, SIZE, CLASSES = 8, 32, 4
DATA = DataSpec("synthetic", None, {"n": N, "n_val": 4, "image_size": SIZE,
                                    "num_classes": CLASSES, "seed": 0})
DATA_ARGS = ["--dataset", "synthetic", "--n", str(N), "--n-val", "4", "--image-size", str(SIZE),
             "--num-classes", str(CLASSES), "--data-seed", "0"]


def _net(library: str, name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if library == "timm":
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw).eval()
    return torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **kw).eval()


def _save(net: nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


class _GuidedReLU(torch.autograd.Function):
    """Guided backprop's ReLU, written out: pass a gradient only where input and gradient > 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0) * (g > 0)


def _guided_reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d logit_y / d x with every nn.ReLU module's backward replaced by the guided rule."""
    originals = []
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            originals.append((m, m.forward))
            m.forward = _GuidedReLU.apply
    try:
        model = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)
        x = x.clone().requires_grad_(True)
        out = model(x).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(out, x)
    finally:
        for m, fwd in originals:
            m.forward = fwd
    return grad


def _cfg(store, teacher, **kw) -> PrecomputeConfig:
    base = {"store": str(store), "data": DATA, "teachers": (teacher,), "methods": ("gbp",),
            "chunk_size": 4, "batch_size": 4, "device": "cpu", "show_progress": False}
    return PrecomputeConfig(**{**base, **kw})


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_stored_gbp_is_captum_guided_backprop_on_the_model(tmp_path, library, one_thread):
    net = _net(library, "resnet18")
    weights = _save(net, tmp_path / "r18.safetensors")
    teacher = f"{library}:resnet18@{weights}"
    res = run(_cfg(tmp_path / "s.zarr", teacher))
    name = f"{library}-resnet18-external-gbp"
    assert [m["name"] for m in res["maps"]] == [name]
    reader = SaliencyStore.open(str(tmp_path / "s.zarr"), "r").split("train").open_map(name)
    stored = reader.read(0, N)

    ds = DATA.open("train")
    x = torch.from_numpy(ds.load_images(0, N)).float() / 255
    y = torch.from_numpy(np.asarray(ds.labels()))
    # captum on the library model behind its normalisation, ReLUs made out-of-place by hand
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    model = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net).eval()
    with pytest.warns(UserWarning, match="backward hooks on ReLU"):  # captum's, every call
        gbp = torch.cat([GuidedBackprop(model).attribute(
            x[s:s + 4].clone().requires_grad_(True), target=y[s:s + 4]).detach()
            for s in range(0, N, 4)])
    assert np.array_equal(stored, np.sign(gbp.numpy()).astype(np.int8))
    assert (stored != 0).reshape(N, -1).any(axis=1).all()  # real maps, not all zeros
    # ... and that is guided backprop (torchvision's BasicBlock calls one ReLU module twice)
    ref = _guided_reference(_net(library, "resnet18"), x, y)
    torch.testing.assert_close(gbp, ref, rtol=1e-4, atol=1e-6)

    prov = reader.provenance
    assert prov["teacher_library"] == library
    assert prov["teacher_library_version"] == (timm if library == "timm" else torchvision).__version__
    assert prov["teacher_model"] == "resnet18"
    assert prov["checkpoint_sha256"] == file_sha256(weights)
    assert prov["teacher_mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert prov["teacher_gbp"] == "exact" and prov["teacher_relu_made_out_of_place"] > 0
    assert prov["teacher_num_classes"] == CLASSES and prov["teacher_cam_layer"] == "layer4"


def test_loaded_teacher_is_the_library_model_behind_its_normalisation(tmp_path):
    net = _net("torchvision", "resnet18")
    path = tmp_path / "t.yaml"
    _save(net, tmp_path / "w.safetensors")
    path.write_text("library: torchvision\nmodel: resnet18\nweights: w.safetensors\n"
                    "mean: [0.5, 0.4, 0.3]\nstd: 0.25\ninput_size: [3, 32, 32]\nname: r18-ft\n")
    prov = describe_teacher(str(path), image_shape=(3, 32, 32), methods=("gbp",))
    assert prov["teacher_arch"] == "r18-ft" and prov["teacher_std"] == [0.25] * 3
    model = load_external(str(path), "cpu", image_shape=(3, 32, 32))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(x), net((x - mean) / 0.25))
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_gelu_teacher_refuses_gbp_with_the_reason_and_runs_gradcampp(tmp_path):
    weights = _save(_net("timm", "convnext_atto"), tmp_path / "c.safetensors")
    teacher = f"timm:convnext_atto@{weights}"
    for method in ("gbp", "guided-gradcam++"):
        with pytest.raises(SatError, match=rf"{re.escape(method)} needs every activation to be an nn.ReLU "
                                           r"module .*gelu.*GELU"):
            describe_teacher(teacher, image_shape=(3, SIZE, SIZE), methods=(method,))
    res = run(_cfg(tmp_path / "s.zarr", teacher, methods=("gradcam++", "gradient")))
    names = sorted(m["name"] for m in res["maps"])
    assert names == ["timm-convnext_atto-external-gradcampp", "timm-convnext_atto-external-gradient"]
    prov = SaliencyStore.open(str(tmp_path / "s.zarr"), "r").split("train").open_map(
        names[0]).provenance
    assert prov["teacher_cam_layer"] == "stages.3" and "gelu" in prov["teacher_gbp"]


def test_functional_relu_refuses_gbp(tmp_path):
    # torchvision's GoogLeNet calls F.relu inside BasicConv2d: captum cannot hook it
    json_path = tmp_path / "g.json"
    _save(_net("torchvision", "googlenet", aux_logits=False, init_weights=True),
          tmp_path / "g.safetensors")
    json_path.write_text(json.dumps({"library": "torchvision", "model": "googlenet",
                                     "weights": "g.safetensors",
                                     "kwargs": {"aux_logits": False, "init_weights": True}}))
    with pytest.raises(SatError, match=r"outside nn.ReLU modules \(relu; .*BasicConv2d"):
        describe_teacher(str(json_path), image_shape=(3, SIZE, SIZE), methods=("gbp",))
    prov = describe_teacher(str(json_path), image_shape=(3, SIZE, SIZE), methods=("gradcam++",))
    assert prov["teacher_cam_layer"] == "inception5b"


class _SideEffectReLU(nn.Module):
    """Relies on the in-place ReLU's side effect: making it out-of-place changes the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        h = self.conv(x)
        self.relu(h)
        return self.fc(h.mean((2, 3)))


class _CleanReLU(_SideEffectReLU):
    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_inplace_relu_made_out_of_place_only_when_exact():
    torch.manual_seed(0)
    clean = _CleanReLU()
    facts = inspect_activations(clean, (3, 8, 8), "conv")
    assert facts == {"gbp_problem": None, "cam_problem": None, "relu_made_out_of_place": 1}
    assert clean.relu.inplace is False
    sneaky = _SideEffectReLU()
    facts = inspect_activations(sneaky, (3, 8, 8), None)
    assert sneaky.relu.inplace is True and facts["relu_made_out_of_place"] == 0
    assert "cannot be made out-of-place" in facts["gbp_problem"]
    assert "no cam layer" in facts["cam_problem"]


def test_changed_weights_are_refused_by_the_worker(tmp_path):
    net = _net("timm", "resnet18")
    weights = _save(net, tmp_path / "r.safetensors")
    prov = describe_teacher(f"timm:resnet18@{weights}", image_shape=(3, SIZE, SIZE))
    with torch.no_grad():
        net.fc.bias.add_(1.0)
    _save(net, weights)
    with pytest.raises(SatError, match="changed since precompute planned"):
        load_external(f"timm:resnet18@{weights}", "cpu", sha256=prov["checkpoint_sha256"],
                      image_shape=(3, SIZE, SIZE))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("timm:resnet18", "expected <library>:<model>@<weights.safetensors>"),
        ("keras:resnet18@w.safetensors", "teacher checkpoint not found"),
        ("timm:resnet18@missing.safetensors", "weights file not found"),
        ("timm:no_such_net@{w}", "timm has no model 'no_such_net'"),
        ("torchvision:resnet34@{w}", "does not fit torchvision 'resnet34'"),
        ("timm:resnet18@{pt}", "is not a readable safetensors file"),
        ("{yaml_dup}", "given twice"),
        ("{json_key}", "unknown key"),
        ("{json_size}", r"takes \[3, 64, 64\] inputs but the images are \[3, 32, 32\]"),
    ],
)
def test_cli_refuses_bad_teachers_with_one_line(tmp_path, spec, match):
    w = _save(_net("torchvision", "resnet18"), tmp_path / "w.safetensors")
    pt = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, pt)  # a pickle: must never be loaded
    (tmp_path / "dup.yaml").write_text("library: timm\nmodel: resnet18\nmodel: resnet34\n"
                                       "weights: w.safetensors\n")
    (tmp_path / "key.json").write_text(json.dumps({"library": "timm", "model": "resnet18",
                                                   "weights": "w.safetensors", "pretrained": True}))
    (tmp_path / "size.json").write_text(json.dumps({"library": "torchvision", "model": "resnet18",
                                                    "weights": "w.safetensors", "input_size": 64}))
    spec = spec.format(w=w, pt=pt, yaml_dup=tmp_path / "dup.yaml", json_key=tmp_path / "key.json",
                       json_size=tmp_path / "size.json")
    res = CliRunner().invoke(main, ["precompute", *DATA_ARGS, "--store", str(tmp_path / "s.zarr"),
                                    "--teacher", spec, "--quiet"])
    assert re.search(match, one_line_error(res)), res.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_refused_method_leaves_no_store(tmp_path):
    w = _save(_net("timm", "convnext_atto"), tmp_path / "c.safetensors")
    res = CliRunner().invoke(main, ["precompute", *DATA_ARGS, "--store", str(tmp_path / "s.zarr"),
                                    "--teacher", f"timm:convnext_atto@{w}", "--method", "gbp",
                                    "--quiet"])
    assert "gbp needs every activation to be an nn.ReLU module" in one_line_error(res)
    assert not (tmp_path / "s.zarr").exists()


def test_cli_cam_layer_names_the_layer(tmp_path):
    w = _save(_net("timm", "resnet18"), tmp_path / "w.safetensors")
    args = ["precompute", *DATA_ARGS, "--store", str(tmp_path / "s.zarr"), "--teacher",
            f"timm:resnet18@{w}", "--method", "gradcam++", "--quiet", "--json"]
    bad = CliRunner().invoke(main, [*args, "--cam-layer", "layer9"])
    assert "cam layer 'layer9' is not a module of 'resnet18'" in one_line_error(bad)
    assert not (tmp_path / "s.zarr").exists()
    ok = CliRunner().invoke(main, [*args, "--cam-layer", "layer3"])
    assert ok.exit_code == 0, ok.output
    prov = SaliencyStore.open(str(tmp_path / "s.zarr"), "r").split("train").open_map(
        "timm-resnet18-external-gradcampp").provenance
    assert prov["teacher_cam_layer"] == "layer3"


def test_parse_short_form_resolves_weights(tmp_path, monkeypatch):
    _save(_net("timm", "resnet18"), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    spec = parse_teacher("timm:resnet18@w.safetensors")
    assert (spec.library, spec.model, spec.weights) == ("timm", "resnet18",
                                                        str(tmp_path / "w.safetensors"))


def test_list_models_and_datasets_say_what_is_available():
    models = CliRunner().invoke(main, ["list", "models"]).output.splitlines()
    assert "resnet18" in models
    assert any(m.startswith("timm:<model>@<weights.safetensors>") and timm.__version__ in m
               for m in models)
    assert any(m.startswith("torchvision:<model>@<weights.safetensors>") for m in models)
    assert "coco" in CliRunner().invoke(main, ["list", "datasets"]).output.split()


def test_dask_workers_rebuild_the_teacher_as_planned(tmp_path):
    weights = _save(_net("torchvision", "resnet18"), tmp_path / "w.safetensors")
    teacher = f"torchvision:resnet18@{weights}"
    maps = []
    for workers in (1, 2):
        store = tmp_path / f"s{workers}.zarr"
        run(_cfg(store, teacher, methods=("gbp", "gradcam++"), workers=workers))
        sp = SaliencyStore.open(str(store), "r").split("train")
        maps.append({name: sp.open_map(name).read(0, sp.n) for name in sp.maps()})
    assert sorted(maps[0]) == ["torchvision-resnet18-external-gbp",
                               "torchvision-resnet18-external-gradcampp"]
    for name in maps[0]:
        assert np.array_equal(maps[0][name], maps[1][name]), name


def test_building_a_teacher_leaves_the_global_rng_alone(tmp_path):
    w = _save(_net("timm", "resnet18"), tmp_path / "w.safetensors")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_external(f"timm:resnet18@{w}", "cpu", image_shape=(3, SIZE, SIZE))
    assert torch.equal(torch.rand(3), expected)
