"""The training stage (`pipelines.train`, `sat train`): every mode end to end on a tiny store,
the run directory it leaves, exact resume, the YAML config, and the SAT schedule per run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipelines.cli import main as sat_cli
from pipelines.train import TrainConfig, run
from saliency_cache.errors import MismatchError, SatError
from tests.helpers import GBP, MASK, make_store
from tests.runs import TIMES, assert_same_weights, without_times
from tests.runs import metrics_rows as rows
from trainer.checkpoint import load_checkpoint
from trainer.loop import LoopConfig
from trainer.perturb import PerturbConfig, create_mode, list_modes

ROW_KEYS = {"epoch", "loss", "train_acc", "val_acc", "val_robust_acc", *TIMES}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train"), n=64, n_val=32, chunk_size=16,
                      maps=("mask", "gbp"))


def maps_for(mode: str) -> tuple[str, ...]:
    m = create_mode(mode)
    if not m.needs_maps:
        return ()
    return (MASK, GBP) if m.multi_map else (GBP,)


def config(store, out, mode="sat", epochs=1, **kw) -> TrainConfig:
    loop = LoopConfig(epochs=epochs, robust_val_samples=16, show_progress=False,
                      **kw.pop("loop", {}))
    kw.setdefault("maps", maps_for(mode))
    return TrainConfig(store=store.path, out=str(out), mode=mode, width=4, batch_size=16,
                       loop=loop, device="cpu", **kw)


# --------------------------------------------------------------------------- every mode


@pytest.mark.parametrize("mode", list_modes())
def test_every_mode_trains_one_epoch_and_writes_its_run_dir(store, tmp_path, mode):
    out = tmp_path / mode
    res = run(config(store, out, mode))
    for f in ("config.json", "metrics.jsonl", "result.json", "checkpoints/last.safetensors",
              "checkpoints/best.safetensors"):
        assert (out / f).is_file(), f
    (row,) = rows(out)
    assert ROW_KEYS <= row.keys()
    assert row["epoch"] == 1 and row["mode"] == mode
    assert row["train_samples"] == store.n
    assert row["loss"] > 0 and all(0 <= row[k] <= 1 for k in ("train_acc", "val_acc",
                                                                 "val_robust_acc"))
    assert row["epoch_time_s"] > 0 and row["images_per_s"] > 0
    result = json.loads((out / "result.json").read_text())
    assert result["final"]["epoch"] == 1 and result == json.loads(json.dumps(res))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mode"] == mode and cfg["maps"] == list(maps_for(mode))
    assert cfg["split_fingerprint"] == store.split().fingerprint
    assert set(cfg["map_provenance"]) == set(maps_for(mode))
    ck = load_checkpoint(out / "checkpoints/last.safetensors")
    assert ck.epoch == 1 and ck.extra["mode"] == mode


def test_training_changes_the_weights_and_workers_cover_the_split(store, tmp_path):
    res = run(config(store, tmp_path / "w", "sat", workers=2))
    assert res["final"]["train_samples"] == store.n
    ck = load_checkpoint(tmp_path / "w/checkpoints/last.safetensors")
    torch.manual_seed(0)
    from trainer.models import create_model

    init = create_model("resnet10", store.num_classes, width=4).state_dict()
    changed = [k for k, v in ck.model_state.items() if v.is_floating_point()
               and not torch.equal(v, init[k])]
    assert changed  # an epoch of training moved the weights


def test_mode_and_maps_must_agree(store, tmp_path):
    with pytest.raises(SatError, match="needs --map"):
        run(config(store, tmp_path / "a", "sat", maps=()))
    with pytest.raises(SatError, match="uses no maps"):
        run(config(store, tmp_path / "b", "standard", maps=(GBP,)))
    with pytest.raises(SatError, match="multi-sat"):
        run(config(store, tmp_path / "c", "sat", maps=(GBP, MASK)))
    with pytest.raises(SatError, match="unknown training mode"):
        config(store, tmp_path / "d", "nope", maps=())


def test_training_on_a_store_of_other_data_is_refused(tmp_path):
    st = make_store(tmp_path, n=32, n_val=16, maps=("mask",), with_images=False)
    other = replace(st.data, options=st.data.options | {"seed": 9})
    with pytest.raises(MismatchError, match="does not match"):
        run(config(st, tmp_path / "r", "sat", maps=(MASK,), data=other))
    run(config(st, tmp_path / "ok", "sat", maps=(MASK,), data=st.data))


# --------------------------------------------------------------------------- resume


def test_resume_continues_exactly_like_an_uninterrupted_run(store, tmp_path):
    full = config(store, tmp_path / "full", "sat", epochs=3)
    run(full)
    part = tmp_path / "part"
    run(replace(full, out=str(part), loop=replace(full.loop, epochs=1)))
    assert [r["epoch"] for r in rows(part)] == [1]
    run(replace(full, out=str(part), resume=True))
    assert without_times(rows(part)) == without_times(rows(tmp_path / "full"))
    assert_same_weights(part / "checkpoints/last.safetensors",
                        tmp_path / "full/checkpoints/last.safetensors")
    assert load_checkpoint(part / "checkpoints/last.safetensors").epoch == 3
    assert_same_weights(part / "checkpoints/best.safetensors",
                        tmp_path / "full/checkpoints/best.safetensors")


def test_resume_after_a_crash_mid_epoch_with_cosine_schedule(store, tmp_path, monkeypatch):
    # A 3-epoch run (cosine lr, SAT schedule against run length) dies during epoch 2, after
    # epoch 1 was saved; resuming it gives the uninterrupted run's weights and metrics.
    import trainer.loop

    full = config(store, tmp_path / "full", "pgd-sat", epochs=3, sat_reach_fraction=0.5,
                  loop={"schedule": "cosine", "optimizer": "sgd", "lr": 0.05})
    run(full)
    real_evaluate = trainer.loop.evaluate
    calls = []

    def dies_in_epoch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(trainer.loop, "evaluate", dies_in_epoch_two)
    crashed = replace(full, out=str(tmp_path / "crash"))
    with pytest.raises(KeyboardInterrupt):
        run(crashed)
    monkeypatch.setattr(trainer.loop, "evaluate", real_evaluate)
    assert [r["epoch"] for r in rows(tmp_path / "crash")] == [1]
    run(replace(crashed, resume=True))
    assert without_times(rows(tmp_path / "crash")) == without_times(rows(tmp_path / "full"))
    assert_same_weights(tmp_path / "crash/checkpoints/last.safetensors",
                        tmp_path / "full/checkpoints/last.safetensors")


def test_resume_without_a_checkpoint_is_refused(store, tmp_path):
    with pytest.raises(SatError, match="does not exist"):
        run(config(store, tmp_path / "none", "standard", resume=True))


def test_resume_with_another_mode_map_or_width_is_refused_and_changes_nothing(store, tmp_path):
    # A resume that silently switched the mode, the map or the model would train a
    # different experiment under the old run's name.
    out = tmp_path / "run"
    r = cli(*train_args(store, out, "--mode", "sat", "--map", GBP, "--epochs", 1))
    assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for flags, said in (
        (["--mode", "standard"], "mode was 'sat'"),
        (["--mode", "sat", "--map", MASK], "maps was"),
        (["--mode", "sat", "--map", GBP, "--seed", 5], "loop.seed was 0"),
        (["--mode", "sat", "--map", GBP, "--width", 8], "width 4, now 8"),
    ):
        r = cli(*train_args(store, out, "--epochs", 2, "--resume", *flags))
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert lines[0].startswith("error: --resume:") and said in lines[0], lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_non_finite_loss_stops_the_run_with_its_step_and_saves_nothing(store, tmp_path, monkeypatch):
    sat_cls = type(create_mode("sat"))
    real, calls = sat_cls.compute, []

    def nan_on_step_3(self, *a, **k):
        loss, logits = real(self, *a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), logits

    monkeypatch.setattr(sat_cls, "compute", nan_on_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SatError, match=r"^loss became nan at epoch 1, step 3; nothing was saved"):
        run(config(store, out, "sat"))
    assert len(calls) == 3  # stopped before the optimiser took the bad step
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_new_run_replaces_old_metrics(store, tmp_path):
    cfg = config(store, tmp_path / "again", "standard", epochs=2)
    run(cfg)
    run(replace(cfg, loop=replace(cfg.loop, epochs=1)))
    assert [r["epoch"] for r in rows(tmp_path / "again")] == [1]


# --------------------------------------------------------------------------- CLI


def cli(*args: str):
    return CliRunner().invoke(sat_cli, [str(a) for a in args], catch_exceptions=False)


def train_args(store, out, *extra):
    return ["train", "--store", store.path, "--out", out, "--width", 4, "--batch-size", 16,
            "--robust-val-samples", 16, "--device", "cpu", "--quiet", *extra]


def test_cli_resume_matches_an_uninterrupted_cli_run(store, tmp_path):
    common = ["--mode", "sat", "--map", GBP, "--seed", 3]
    r = cli(*train_args(store, tmp_path / "full", *common, "--epochs", 3))
    assert r.exit_code == 0, r.output
    r = cli(*train_args(store, tmp_path / "part", *common, "--epochs", 1))
    assert r.exit_code == 0, r.output
    r = cli(*train_args(store, tmp_path / "part", *common, "--epochs", 3, "--resume"))
    assert r.exit_code == 0, r.output
    assert "epoch 3" in r.output
    assert without_times(rows(tmp_path / "part")) == without_times(rows(tmp_path / "full"))
    assert_same_weights(tmp_path / "part/checkpoints/last.safetensors",
                        tmp_path / "full/checkpoints/last.safetensors")
    assert json.loads((tmp_path / "part/config.json").read_text())["resume"] is True


def test_cli_reads_a_yaml_config_and_flags_override_it(store, tmp_path):
    conf = tmp_path / "train.yaml"
    conf.write_text(yaml.safe_dump({
        "store": store.path, "mode": "multi-sat", "map": [MASK, GBP], "width": 4,
        "batch-size": 16, "epochs": 2, "robust_val_samples": 8, "sat-eps": 4.0,
        "device": "cpu", "quiet": True, "seed": 5,
    }))
    out = tmp_path / "run"
    r = cli("train", "--config", conf, "--out", out, "--epochs", 1, "--sat-eps", 6)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mode"] == "multi-sat" and cfg["maps"] == [MASK, GBP]
    assert cfg["width"] == 4 and cfg["batch_size"] == 16
    assert cfg["loop"]["epochs"] == 1 and cfg["loop"]["seed"] == 5  # flag wins, YAML fills in
    assert cfg["loop"]["robust_val_samples"] == 8
    assert cfg["perturb"]["sat_eps"] == pytest.approx(6 / 255)
    assert [r["epoch"] for r in rows(out)] == [1]
    # A --map flag replaces the YAML's list rather than adding to it.
    r = cli("train", "--config", conf, "--out", tmp_path / "one", "--epochs", 1,
            "--mode", "sat", "--map", GBP)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "one/config.json").read_text())["maps"] == [GBP]


def test_cli_refuses_bad_configs_with_exit_2(store, tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump({"store": store.path, "no-such-option": 1}))
    r = cli("train", "--config", conf, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "no_such_option" in r.output
    assert not (tmp_path / "x").exists()
    r = cli(*train_args(store, tmp_path / "y", "--mode", "sat", "--epochs", 1))
    assert r.exit_code == 2 and "error: training mode 'sat' needs --map" in r.output
    assert not (tmp_path / "y" / "metrics.jsonl").exists()
    r = cli(*train_args(store, tmp_path / "z", "--mode", "standard", "--map", GBP))
    assert r.exit_code == 2 and "uses no maps" in r.output
    r = cli(*train_args(store, tmp_path / "w", "--mode", "sat", "--map", "nope"))
    assert r.exit_code == 2 and "no map 'nope'" in r.output
    r = cli(*train_args(store, tmp_path / "v", "--mode", "standard", "--resume"))
    assert r.exit_code == 2 and "--resume given" in r.output


# --------------------------------------------------------------------------- SAT schedule


def test_sat_schedule_against_run_length_is_recorded_and_used(store, tmp_path, monkeypatch):
    import trainer.perturb

    seen: list[float] = []
    real = trainer.perturb.sat_perturb

    def spy(x, smap, *, eps, p_random, generator):
        seen.append(p_random)
        return real(x, smap, eps=eps, p_random=p_random, generator=generator)

    monkeypatch.setattr(trainer.perturb, "sat_perturb", spy)
    out = tmp_path / "reach"
    cfg = config(store, out, "sat", epochs=2, sat_reach_fraction=0.5)
    assert cfg.effective_perturb().sat_time_scale == pytest.approx(10.0)
    run(cfg)
    rec = json.loads((out / "config.json").read_text())
    assert rec["sat_reach_fraction"] == 0.5
    assert rec["perturb"]["sat_time_scale"] == 1.0  # what was asked for
    assert rec["effective_perturb"]["sat_time_scale"] == pytest.approx(10.0)  # what ran
    # alpha^t is 1 in epoch 0 and reaches 0.6 at half of this 2-epoch run (epoch index 1).
    steps = store.n // 16
    assert seen[:steps] == [1.0] * steps
    assert seen[steps:] == pytest.approx([0.6] * steps)


def test_cli_sat_reach_sets_the_effective_time_scale(store, tmp_path):
    out = tmp_path / "cli-reach"
    r = cli(*train_args(store, out, "--mode", "sat", "--map", MASK, "--epochs", 1,
                        "--sat-reach", 0.25, "--val-split", ""))
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "config.json").read_text())
    assert rec["effective_perturb"]["sat_time_scale"] == pytest.approx(40.0)
    assert "val_acc" not in rows(out)[0]


def test_without_reach_fraction_the_paper_schedule_is_kept(store):
    cfg = TrainConfig(store=store.path, out="unused", perturb=PerturbConfig(sat_time_scale=2.0))
    assert cfg.effective_perturb().sat_time_scale == 2.0
    with pytest.raises(SatError, match="reach fraction"):
        TrainConfig(store=store.path, out="unused", sat_reach_fraction=1.5)


def test_cosine_schedule_spans_the_batches_that_workers_really_yield(store, tmp_path):
    # 64 samples in blocks of 16, batches of 24, 2 DataLoader workers: each worker cuts its
    # 32 samples into 2 batches, so an epoch has 4 steps, not ceil(64 / 24) = 3. The cosine
    # schedule must be sized from the 4, or the learning rate reaches 0 an epoch early.
    from trainer.loader import StoreStream

    loop = LoopConfig(epochs=2, robust_val_samples=0, show_progress=False, optimizer="sgd",
                      lr=0.1, schedule="cosine")
    cfg = TrainConfig(store=store.path, out=str(tmp_path / "run"), mode="standard", width=4,
                      batch_size=24, workers=2, loop=loop, device="cpu", maps=())
    run(cfg)
    per_epoch = [StoreStream(store.path, "train", (), batch_size=24, seed=loop.seed)
                 .epoch_steps(e, num_workers=2) for e in range(2)]
    assert per_epoch[0] == 4
    total = sum(per_epoch)
    lr_after_first = [r["lr"] for r in rows(tmp_path / "run")][0]
    assert lr_after_first == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * per_epoch[0] / total)))
    assert [r["steps"] for r in rows(tmp_path / "run")] == per_epoch


# ---- progress bars in logs -----------------------------------------------------------------
class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "preset", "expected"), [
    (False, None, "30"),    # a log file or CI: redraw every 30 s
    (False, "2", "2"),      # the user's own choice stays
    (True, None, None),     # a terminal keeps tqdm's default
])
def test_progress_bars_redraw_rarely_when_stderr_is_not_a_terminal(monkeypatch, tty, preset, expected):
    import pipelines.cli as cli

    monkeypatch.setattr(cli.sys, "stderr", _Stream(tty))
    if preset is None:
        monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    else:
        monkeypatch.setenv("TQDM_MININTERVAL", preset)
    cli._quiet_progress_in_logs()
    assert os.environ.get("TQDM_MININTERVAL") == expected


def test_training_in_a_log_redraws_its_bars_rarely(store, tmp_path):
    # stderr to a pipe, as under CI or nohup: each epoch's bar is drawn when it opens and
    # when it closes, not at every step (16 steps here), postfix updates included.
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--store", store.path, "--mode", "sat",
         "--map", GBP, "--width", "4", "--batch-size", "4", "--epochs", "2", "--device", "cpu",
         "--robust-val-samples", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    redraws = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if "[sat]" in ln]
    assert 2 <= len(redraws) <= 2 * 3, redraws


def test_tqdm_takes_its_redraw_interval_from_the_environment():
    # The mechanism the CLI relies on (tqdm reads TQDM_* defaults at import).
    code = "from tqdm.auto import tqdm; print(tqdm(total=1, disable=False).mininterval)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TQDM_MININTERVAL": "30"})
    assert float(out.stdout.strip()) == 30.0


def test_a_run_written_before_the_gradnorm_and_sgt_settings_still_resumes(store, tmp_path):
    """Runs trained before gradnorm/sgt existed have no such keys in their config: they resume
    as if they held the defaults, and a resume with another value is still refused."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "old"
    cfg = config(store, out, "standard", epochs=1)
    run(cfg)
    for name in ("last", "best"):
        path = out / "checkpoints" / f"{name}.safetensors"
        ck = load_checkpoint(path)
        for key in ("gradnorm_lambda", "sgt_fraction", "sgt_fill", "sgt_lambda"):
            del ck.config["perturb"][key]
        save_checkpoint(path, ck)
    other = replace(cfg, resume=True, perturb=replace(cfg.perturb, sgt_lambda=3.0))
    with pytest.raises(SatError, match=r"--resume: perturb was .* now .*'sgt_lambda': 3\.0"):
        run(other)
    res = run(replace(cfg, loop=replace(cfg.loop, epochs=2), resume=True))
    assert res["epochs"] == 2 and [r["epoch"] for r in rows(out)] == [1, 2]
