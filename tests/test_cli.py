"""The ``sat`` command takes its names and defaults from the library: the stage configs'
dataclass defaults and the vocabularies the configs validate against, written once."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

import pipelines.evaluate
import pipelines.precompute
import pipelines.teacher
import pipelines.train
from pipelines.cli import main
from pipelines.evaluate import EvalConfig
from pipelines.precompute import PrecomputeConfig
from pipelines.teacher import TeacherConfig
from pipelines.train import TrainConfig
from trainer.loop import LoopConfig
from trainer.perturb import PerturbConfig


def _config_built_by(monkeypatch, module, args):
    """The config ``sat <args>`` passes to ``module.run`` (which is not run)."""
    built = []
    monkeypatch.setattr(module, "run", lambda cfg: built.append(cfg) or {})
    res = CliRunner().invoke(main, args)
    assert built, (res.output, res.exception)
    return built[0]


def test_options_left_out_give_the_configs_defaults(monkeypatch, tmp_path):
    cfg = _config_built_by(monkeypatch, pipelines.train, [
        "train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "r"),
        "--device", "cpu", "--quiet"])
    assert cfg.perturb == PerturbConfig()  # budgets went through /255 and back unchanged
    assert cfg.loop == LoopConfig(show_progress=False)
    defaults = TrainConfig(store=cfg.store, out=cfg.out, loop=cfg.loop)
    assert cfg.mode == defaults.mode and cfg.batch_size == defaults.batch_size
    assert cfg.split == defaults.split and cfg.workers == defaults.workers

    cfg = _config_built_by(monkeypatch, pipelines.teacher, [
        "teacher", "--dataset", "synthetic", "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert cfg == TeacherConfig(data=cfg.data, out=cfg.out)

    cfg = _config_built_by(monkeypatch, pipelines.precompute, [
        "precompute", "--dataset", "synthetic", "--store", str(tmp_path / "p.zarr"),
        "--device", "cpu"])
    assert cfg == PrecomputeConfig(store=cfg.store, data=cfg.data, methods=())

    checkpoint = tmp_path / "c.safetensors"
    checkpoint.touch()
    cfg = _config_built_by(monkeypatch, pipelines.evaluate, [
        "eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--device", "cpu"])
    assert cfg == EvalConfig(checkpoint=cfg.checkpoint, data=cfg.data)


def test_a_default_changed_in_the_config_changes_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(LoopConfig, "epochs", 7)
    monkeypatch.setattr(PerturbConfig, "sat_eps", 6 / 255)
    res = CliRunner().invoke(main, ["train", "--help"])
    assert "[default: 7]" in res.output and "[default: 6.0]" in res.output
    cfg = _config_built_by(monkeypatch, pipelines.train, [
        "train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "r"),
        "--device", "cpu"])
    assert cfg.loop.epochs == 7 and cfg.perturb.sat_eps == 6 / 255


@pytest.mark.parametrize("args, expected", [
    (["precompute", "--target", "saliency"], "'label', 'argmax'"),
    (["teacher", "--mode", "robust"], "'standard', 'adversarial', 'sparse'"),
    (["train", "--optimizer", "lamb"], "'adam', 'sgd'"),
    (["train", "--schedule", "linear"], "'none', 'cosine', 'step'"),
])
def test_choices_are_the_library_vocabularies(args, expected):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and expected in res.output, res.output


def test_the_command_starts_without_torch_or_zarr():
    code = (
        "import sys; from click.testing import CliRunner; from pipelines.cli import main; "
        "r = CliRunner().invoke(main, ['cache', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'zarr' not in sys.modules, 'zarr imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
