"""Teacher training (``pipelines.teacher.run`` and ``sat teacher``): standard, PGD-adversarial
and 95 %-sparse teachers on tiny synthetic data, their exported weights, JSON and metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

from pipelines.cli import main
from pipelines.common import DataSpec
from pipelines.teacher import TeacherConfig, describe_teacher, run
from saliency_cache.errors import SatError
from tests.runs import assert_same_weights, metrics_rows, without_times
from trainer.checkpoint import file_sha256, load_checkpoint, load_model
from trainer.loop import LoopConfig

DATA = DataSpec("synthetic", None, {"n": 64, "n_val": 32, "image_size": 16, "num_classes": 4, "seed": 0})
DATA_ARGS = ["--dataset", "synthetic", "--n", "64", "--n-val", "32", "--image-size", "16",
             "--num-classes", "4", "--data-seed", "0"]


def _loop(**kw) -> LoopConfig:
    # One epoch, a small robust check: a teacher trains in a second or two on 2 cores.
    return LoopConfig(**{"epochs": 1, "show_progress": False, "robust_val_samples": 8, **kw})


def _train(out: Path, mode: str, **kw) -> dict:
    cfg = TeacherConfig(data=DATA, out=str(out), width=4, mode=mode, loop=_loop(),
                        batch_size=32, device="cpu", **kw)
    return run(cfg)


def _weight_sparsity(model: nn.Module) -> float:
    """Exact zeros among every convolution and linear weight, counted here independently."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.fixture(scope="module")
def standard(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("teacher") / "standard"
    return out, _train(out, "standard")


def test_standard_teacher_writes_safetensors_json_and_metrics_log(standard):
    out, res = standard
    weights = out / "teacher.safetensors"
    with safe_open(str(weights), framework="pt") as f:  # a real safetensors file, nothing pickled
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["kind"] == "sat-checkpoint"
    assert keys and all(k.startswith("model.") for k in keys)  # weights only, no optimizer state

    info = json.loads((out / "teacher.json").read_text())
    assert info["sha256"] == file_sha256(weights) == res["sha256"]
    assert info["mode"] == "standard" and info["arch"] == "resnet10" and info["width"] == 4
    assert info["sparsity"] is None
    assert info["fingerprint"] == DATA.open("train").fingerprint()
    cfg = info["config"]
    assert cfg["stage"] == "teacher" and cfg["mode"] == "standard" and cfg["width"] == 4
    assert cfg["data"]["options"]["n"] == 64 and cfg["loop"]["epochs"] == 1
    assert 0.0 <= info["metrics"]["val_acc"] <= 1.0 and info["metrics"]["epoch"] == 1

    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == [1]
    assert rows[0]["mode"] == "standard" and rows[0]["loss"] > 0 and "val_acc" in rows[0]

    model, ck = load_model(weights, "cpu")
    assert ck.extra["teacher_mode"] == "standard"
    assert ck.arch["num_classes"] == 4 and ck.arch["width"] == 4
    x = torch.from_numpy(DATA.open("val").load_images(0, 8)).float() / 255
    with torch.no_grad():
        assert model(x).shape == (8, 4)
    # The exported teacher is the model the loop finished with.
    last = load_checkpoint(out / "checkpoints" / "last.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, last.model_state[k]), k

    prov = describe_teacher(weights)
    assert prov["teacher_arch"] == "resnet10" and prov["teacher_mode"] == "standard"
    assert prov["checkpoint_sha256"] == info["sha256"] and prov["teacher_num_classes"] == 4


def test_training_is_reproducible_for_a_seed(standard, tmp_path):
    out, _ = standard
    _train(tmp_path / "again", "standard")
    a, _ = load_model(out / "teacher.safetensors", "cpu")
    b, _ = load_model(tmp_path / "again" / "teacher.safetensors", "cpu")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_adversarial_teacher_trains_on_pgd_examples(standard, tmp_path):
    out, _ = standard
    res = _train(tmp_path / "adv", "adversarial")
    info = json.loads((tmp_path / "adv" / "teacher.json").read_text())
    assert info["mode"] == "adversarial" and res["sparsity"] is None
    rows = metrics_rows(tmp_path / "adv")
    assert [r["mode"] for r in rows] == ["pgd"]  # the loop ran the PGD-AT training mode
    adv, ck = load_model(tmp_path / "adv" / "teacher.safetensors", "cpu")
    assert ck.extra["teacher_mode"] == "adversarial"
    assert describe_teacher(tmp_path / "adv" / "teacher.safetensors")["teacher_mode"] == "adversarial"
    # Same seed, data and initialisation as the standard teacher: only the perturbation differs.
    std, _ = load_model(out / "teacher.safetensors", "cpu")
    assert not torch.equal(adv.fc.weight, std.fc.weight)


def test_sparse_teacher_from_the_cli_is_95_percent_zeros(tmp_path):
    out = tmp_path / "sparse"
    res = CliRunner().invoke(main, [
        "teacher", *DATA_ARGS, "--width", "4", "--mode", "sparse", "--epochs", "1",
        "--prune-steps", "2", "--finetune-epochs", "1", "--batch-size", "32",
        "--robust-val-samples", "8", "--device", "cpu", "--quiet", "--json", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)
    info = json.loads((out / "teacher.json").read_text())
    model, ck = load_model(out / "teacher.safetensors", "cpu")
    measured = _weight_sparsity(model)
    assert measured >= 0.95
    assert info["sparsity"] == pytest.approx(measured, abs=1e-6)
    assert printed["sparsity"] == info["sparsity"] and ck.extra["sparsity"] == info["sparsity"]
    assert info["mode"] == "sparse" and ck.extra["teacher_mode"] == "sparse"
    # Plain weights: no pruning re-parametrisation left in the file.
    with safe_open(str(out / "teacher.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith(("_orig", "_mask"))]
    # Every prune + fine-tune phase is logged, its sparsity rising to the target.
    phase_sparsity = [metrics_rows(out / f"prune{k}")[-1]["sparsity"] for k in (1, 2)]
    assert phase_sparsity[0] < phase_sparsity[1] and phase_sparsity[1] >= 0.95
    assert len(info["phases"]) == 3  # dense training, then two prune steps
    assert (out / "metrics.jsonl").is_file()
    # The sparse teacher still classifies (its logits are not all equal).
    x = torch.from_numpy(DATA.open("val").load_images(0, 8)).float() / 255
    with torch.no_grad():
        assert model(x).std() > 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "robust"}, "unknown teacher mode"),
        ({"arch": "vgg"}, "unknown architecture"),
        ({"width": 0}, "width must be >= 1"),
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"prune_steps": 0}, "prune_steps"),
    ],
)
def test_bad_teacher_config_is_refused(kw, match, tmp_path):
    with pytest.raises(SatError, match=match):
        TeacherConfig(data=DATA, out=str(tmp_path), **kw)
    assert not any(tmp_path.iterdir())


def test_cli_reports_bad_input_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["teacher", *DATA_ARGS, "--arch", "vgg", "--device", "cpu",
                                    "--out", str(tmp_path / "t")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown architecture 'vgg'")
    assert "resnet10" in lines[0]  # the message lists the valid choices
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------- resume

def _sparse(out: Path, **kw) -> TeacherConfig:
    return TeacherConfig(data=DATA, out=str(out), width=4, mode="sparse", loop=_loop(),
                         batch_size=32, prune_steps=2, finetune_epochs=2, device="cpu", **kw)


@pytest.fixture(scope="module")
def sparse_full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "sparse"
    run(_sparse(out))
    return out


# Each epoch of a phase evaluates once, before its checkpoint: dense (call 1), prune step 1
# (calls 2, 3), prune step 2 (calls 4, 5). Dying in call 3 leaves prune1 one epoch in; dying
# in call 4 leaves prune1 complete and prune2 with no checkpoint at all.
@pytest.mark.parametrize("die_at", [3, 4])
def test_sparse_teacher_killed_mid_pruning_resumes_to_the_same_weights(
    sparse_full, tmp_path, monkeypatch, die_at
):
    import trainer.loop

    real_evaluate = trainer.loop.evaluate
    calls = []
    kill = [die_at]

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == kill[0]:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(trainer.loop, "evaluate", dies)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(_sparse(out))
    assert not (out / "teacher.safetensors").exists()

    calls.clear()
    kill[0] = 0  # the resumed run lives; count the epochs it trains
    res = run(_sparse(out, resume=True))
    assert len(calls) == 5 - (die_at - 1)  # only the epochs the killed run had not saved
    full_info = json.loads((sparse_full / "teacher.json").read_text())
    assert_same_weights(out / "teacher.safetensors", sparse_full / "teacher.safetensors")
    assert res["config"]["resume"] is True  # the export records that it was resumed
    assert res["sparsity"] == full_info["sparsity"] >= 0.95
    for sub in (".", "prune1", "prune2"):
        assert without_times(metrics_rows(out / sub)) == \
            without_times(metrics_rows(sparse_full / sub)), sub


def test_resuming_a_finished_teacher_exports_it_again_without_training(sparse_full, tmp_path):
    import shutil

    out = tmp_path / "done"
    shutil.copytree(sparse_full, out)
    before = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    run(_sparse(out, resume=True))
    assert_same_weights(out / "teacher.safetensors", sparse_full / "teacher.safetensors")
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == before  # nothing retrained


def test_teacher_resume_with_other_settings_is_refused_in_one_line(standard, tmp_path):
    import shutil

    out = tmp_path / "std"
    shutil.copytree(standard[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for flags, word in ((["--mode", "adversarial"], "mode"), (["--width", "8"], "width")):
        res = CliRunner().invoke(main, [
            "teacher", *DATA_ARGS, "--width", "4", "--epochs", "2", "--batch-size", "32",
            "--robust-val-samples", "8", "--device", "cpu", "--quiet", "--out", str(out),
            "--resume", *flags,
        ])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --resume:") and word in lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_teacher_resume_continues_to_more_epochs(standard, tmp_path):
    import shutil

    out = tmp_path / "more"
    shutil.copytree(standard[0], out)
    res = CliRunner().invoke(main, [
        "teacher", *DATA_ARGS, "--width", "4", "--epochs", "2", "--batch-size", "32",
        "--robust-val-samples", "8", "--device", "cpu", "--quiet", "--out", str(out), "--resume",
    ])
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in metrics_rows(out)] == [1, 2]
    run(TeacherConfig(data=DATA, out=str(tmp_path / "two"), width=4, mode="standard",
                      loop=_loop(epochs=2), batch_size=32, device="cpu"))
    assert_same_weights(out / "teacher.safetensors", tmp_path / "two" / "teacher.safetensors")
