"""``sat eval``: results files, determinism, store vs dataset splits, the cached-map saliency
attack, the robustness orderings a user reads off the table, alignment, and refused input.

One tiny model is trained once per module (synthetic shapes, 128 training images of 16x16,
ResNet-10 of width 8, 10 epochs: about 2 s) and attacked on 16-64 samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.common import DataSpec
from pipelines.evaluate import EvalConfig
from pipelines.evaluate import run as run_eval
from saliency_cache.errors import SatError

DATA_OPTS = {"n": 128, "n_val": 32, "image_size": 16, "num_classes": 4, "seed": 0}
DATA_ARGS = ["--dataset", "synthetic", "--n", "128", "--n-val", "32", "--image-size", "16",
             "--num-classes", "4", "--data-seed", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of the synthetic set (images, mask maps on train and val) and a standard
    ResNet-10 trained on it through the real precompute and train stages."""
    from pipelines.precompute import PrecomputeConfig
    from pipelines.precompute import run as precompute
    from pipelines.train import TrainConfig
    from pipelines.train import run as train
    from trainer.loop import LoopConfig

    root = tmp_path_factory.mktemp("eval")
    data = DataSpec("synthetic", None, dict(DATA_OPTS))
    store = str(root / "store.zarr")
    precompute(PrecomputeConfig(store=store, data=data, map_splits=("train", "val"),
                                weak=("mask",), chunk_size=32, show_progress=False))
    loop = LoopConfig(epochs=10, seed=0, robust_val_samples=0, best_metric="val_acc",
                      crop_padding=0, flip=False, show_progress=False)
    train(TrainConfig(store=store, out=str(root / "run"), mode="standard", width=8,
                      batch_size=32, loop=loop, device="cpu"))
    return SimpleNamespace(
        root=root, store=store, data=data, run=root / "run",
        ckpt=str(root / "run" / "checkpoints" / "best.safetensors"),
    )


def _sat(args: list[str]):
    return CliRunner().invoke(main, args)


def _ok(res) -> None:
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)


def _error(res) -> str:
    """The single ``error: ...`` line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _eval_args(t, out: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", t.ckpt, "--device", "cpu", "--out", str(out), *extra]


def test_eval_on_a_store_writes_results_json_and_markdown(trained, tmp_path):
    """Every paper attack (plus AutoAttack) at every ε; results.json carries clean accuracy,
    per-attack-per-ε accuracy, alignment, n and the row label; --json prints the same
    summary; the progress bar goes to stderr."""
    out = tmp_path / "ev"
    attacks = "pgd5,pgd20,pgd40,uniform,trades,saliency,autoattack"
    res = _sat(_eval_args(trained, out, "--store", trained.store, "--attacks", attacks,
                          "--eps", "1,2,3,4", "--max-samples", "16", "--json"))
    _ok(res)
    summary = json.loads((out / "results.json").read_text())
    printed = json.loads(res.stdout)
    assert printed["results"] == summary["results"]
    assert summary["n"] == 16 and summary["split"] == "val"
    assert summary["label"] == "Original" and summary["mode"] == "standard"
    assert summary["arch"]["name"] == "resnet10" and summary["num_classes"] == 4
    r = summary["results"]
    assert set(r["attacks"]) == set(attacks.split(","))
    for name, by_eps in r["attacks"].items():
        assert set(by_eps) == ({"8", "16", "32"} if name == "uniform" else {"1", "2", "3", "4"})
        for acc in by_eps.values():
            assert 0.0 <= acc <= 1.0 and (acc * 16) == pytest.approx(round(acc * 16))
    assert 0.0 <= r["clean"] <= 1.0
    assert r["alignment"] > 0.0 and np.isfinite(r["alignment"])
    assert summary["attack_params"]["pgd20"]["steps"] == 20
    # Loss-maximising attacks never leave the model more accurate than on clean inputs
    # (uniform noise and the KL-based TRADES attack can, on samples it got wrong).
    for name in ("pgd5", "pgd20", "pgd40", "autoattack"):
        assert max(r["attacks"][name].values()) <= r["clean"]
    md = (out / "results.md").read_text()
    assert "clean accuracy" in md and "alignment" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "/255" in ln]
    assert len(rows) == 6 * 4 + 3
    assert f"| pgd40 | 3/255 | {100 * r['attacks']['pgd40']['3']:.2f} |" in rows
    # progress on stderr, machine-readable output alone on stdout
    assert "eval" in res.stderr and "100%" in res.stderr


def test_eval_is_deterministic_for_a_seed(trained, tmp_path):
    args = ["--store", trained.store, "--attacks", "pgd5,uniform,trades,saliency",
            "--eps", "2", "--uniform-eps", "16", "--max-samples", "16", "--quiet", "--seed", "3"]
    runs = []
    for k in range(2):
        _ok(_sat(_eval_args(trained, tmp_path / f"ev{k}", *args)))
        runs.append(json.loads((tmp_path / f"ev{k}" / "results.json").read_text()))
    assert runs[0]["results"] == runs[1]["results"]
    assert runs[0]["config"]["seed"] == 3


def test_quiet_eval_shows_no_progress(trained, tmp_path):
    res = _sat(_eval_args(trained, tmp_path / "ev", "--store", trained.store, "--attacks",
                          "pgd5", "--eps", "1", "--max-samples", "8", "--quiet"))
    _ok(res)
    assert res.stderr == ""
    assert res.stdout.startswith("# Evaluation of Original")


def test_eval_on_a_dataset_split_matches_the_store_split(trained, tmp_path):
    """The store holds the dataset's own images, so both routes give the same numbers."""
    common = ["--attacks", "pgd5,uniform", "--eps", "2", "--uniform-eps", "16",
              "--max-samples", "16", "--quiet"]
    _ok(_sat(_eval_args(trained, tmp_path / "s", "--store", trained.store, *common)))
    _ok(_sat(_eval_args(trained, tmp_path / "d", *DATA_ARGS, *common)))
    s = json.loads((tmp_path / "s" / "results.json").read_text())
    d = json.loads((tmp_path / "d" / "results.json").read_text())
    assert d["results"] == s["results"]
    assert d["fingerprint"] == s["fingerprint"]
    assert d["dataset"]["name"] == "synthetic" and "store" not in d


def test_saliency_attack_with_a_cached_map(trained, tmp_path):
    """``saliency-map`` + ``--map``: accuracy on clip(x - ε·s, 0, 1) with s the stored map,
    checked against the same computation done by hand from the store."""
    from saliency_cache.store import SaliencyStore
    from trainer.checkpoint import load_model

    out = tmp_path / "ev"
    _ok(_sat(_eval_args(trained, out, "--store", trained.store, "--split", "val",
                        "--attacks", "saliency-map", "--map", "mask", "--eps", "8,32",
                        "--quiet", "--no-alignment")))
    r = json.loads((out / "results.json").read_text())["results"]
    assert "alignment" not in r

    split = SaliencyStore.open(trained.store, "r").split("val")
    x = torch.from_numpy(split.read_images(0, split.n)).float() / 255
    y = torch.from_numpy(np.asarray(split.labels(), dtype=np.int64))
    s = torch.from_numpy(split.open_map("mask").read(0, split.n)).float()  # (N, 1, H, W)
    assert s.shape == (32, 1, 16, 16) and set(s.unique().tolist()) <= {-1.0, 1.0}
    model, _ = load_model(trained.ckpt, "cpu")
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        for eps in (8, 32):
            xa = torch.clamp(x - eps / 255 * s, 0, 1)
            assert float(r["attacks"]["saliency-map"][str(eps)]) == pytest.approx(
                (model(xa).argmax(1) == y).float().mean().item(), abs=1e-9)
    assert r["clean"] == pytest.approx(clean, abs=1e-9)


def test_robustness_orderings_on_a_trained_model(trained, tmp_path):
    """On the training split (clean accuracy well above chance): PGD <= FGSM <= clean, more PGD steps
    never help the model beyond one or two samples, and a larger ε never helps either."""
    n = 64
    summary = run_eval(EvalConfig(
        checkpoint=trained.ckpt, store=trained.store, split="train", max_samples=n,
        attacks=("fgsm", "pgd5", "pgd20", "pgd40"), eps=(1, 2, 4), out=str(tmp_path / "ev"),
        alignment=False, boundary=False, device="cpu", show_progress=False,
    ))
    r, tol = summary["results"], 2 / n
    a = r["attacks"]
    assert r["clean"] >= 0.75  # the model learned its training set: orderings mean something
    assert a["pgd5"]["4"] < r["clean"] - 0.25  # and the attacks bite
    for e in ("1", "2", "4"):
        assert a["fgsm"][e] <= r["clean"]
        assert a["pgd5"][e] <= a["fgsm"][e] + tol
        assert a["pgd20"][e] <= a["pgd5"][e] + tol
        assert a["pgd40"][e] <= a["pgd20"][e] + tol
    for name in ("fgsm", "pgd5", "pgd20", "pgd40"):
        assert a[name]["4"] <= a[name]["2"] + tol <= a[name]["1"] + 2 * tol


def test_alignment_is_the_mean_per_sample_alignment(trained, tmp_path):
    from saliency_cache.store import SaliencyStore
    from trainer.attacks.metrics import alignment
    from trainer.checkpoint import load_model

    summary = run_eval(EvalConfig(
        checkpoint=trained.ckpt, store=trained.store, split="val", max_samples=20,
        batch_size=8, attacks=("uniform",), uniform_eps=(8,), out=str(tmp_path / "ev"),
        device="cpu", show_progress=False,
    ))
    split = SaliencyStore.open(trained.store, "r").split("val")
    x = torch.from_numpy(split.read_images(0, 20)).float() / 255
    y = torch.from_numpy(np.asarray(split.labels(), dtype=np.int64)[:20])
    model, _ = load_model(trained.ckpt, "cpu")
    expect = alignment(model, x, y).double().mean().item()
    assert summary["results"]["alignment"] == pytest.approx(expect, rel=1e-4)
    assert expect > 0


def test_repeated_attacks_and_budgets_are_counted_once(trained, tmp_path):
    """``pgd`` is PGD-5: ``pgd,pgd5,PGD5`` at ``2,2.0`` is one measurement, not three."""
    common = ["--store", trained.store, "--max-samples", "16", "--quiet", "--no-alignment"]
    _ok(_sat(_eval_args(trained, tmp_path / "a", *common, "--attacks", "pgd,pgd5,PGD5",
                        "--eps", "2,2.0")))
    _ok(_sat(_eval_args(trained, tmp_path / "b", *common, "--attacks", "pgd5", "--eps", "2")))
    a = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert a == b and list(a["attacks"]) == ["pgd5"] and list(a["attacks"]["pgd5"]) == ["2"]


def test_default_output_is_the_run_directory(trained):
    """Without --out, results land in ``<run>/eval`` next to the run's checkpoints/."""
    res = _sat(["eval", "--checkpoint", trained.ckpt, "--store", trained.store, "--device",
                "cpu", "--attacks", "saliency", "--eps", "1", "--max-samples", "4", "--quiet"])
    _ok(res)
    summary = json.loads((trained.run / "eval" / "results.json").read_text())
    assert summary["n"] == 4 and summary["checkpoint"] == trained.ckpt
    assert list(summary["results"]["attacks"]) == ["saliency"]
    assert (trained.run / "eval" / "results.md").read_text() + "\n" == res.stdout


# ---- refused input: exit 2, one line quoting the bad value, nothing written ---------------
def _truncated(t, root: Path) -> str:
    p = root / "cut.safetensors"
    p.write_bytes(Path(t.ckpt).read_bytes()[:1000])
    return str(p)


BAD = {
    "other-architecture": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store,
                                          "--arch", "resnet34"], "resnet34"),
    "other-num-classes": (lambda t, r: ["--checkpoint", t.ckpt, "--dataset", "synthetic",
                                         "--n", "32", "--image-size", "16", "--num-classes",
                                         "6"], "has 6"),
    "unknown-attack": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store,
                                      "--attacks", "pgd5,bogus"], "bogus"),
    "negative-eps": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store,
                                    "--eps", "1,-2"], "-2"),
    "negative-uniform-eps": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store,
                                            "--uniform-eps", "-8"], "-8"),
    "missing-checkpoint": (lambda t, r: ["--checkpoint", str(r / "nope.safetensors"),
                                          "--store", t.store], "nope.safetensors"),
    "truncated-checkpoint": (lambda t, r: ["--checkpoint", _truncated(t, r), "--store",
                                            t.store], "truncated or corrupt"),
    "no-budgets": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store, "--eps", ""],
                   "--eps"),
    "map-without-store": (lambda t, r: ["--checkpoint", t.ckpt, *DATA_ARGS, "--attacks",
                                         "saliency-map", "--map", "mask"], "--store"),
    "unknown-map": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store, "--attacks",
                                   "saliency-map", "--map", "nomap"], "nomap"),
    "store-and-dataset": (lambda t, r: ["--checkpoint", t.ckpt, "--store", t.store,
                                         *DATA_ARGS], "exactly one"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_eval_input_is_refused(trained, tmp_path, case):
    make, quoted = BAD[case]
    out = tmp_path / "out"
    line = _error(_sat(["eval", *make(trained, tmp_path), "--device", "cpu", "--quiet",
                        "--out", str(out)]))
    assert quoted in line
    assert not out.exists()


def test_eval_config_refuses_an_output_path_that_is_a_file(trained, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SatError, match="not a directory"):
        EvalConfig(checkpoint=trained.ckpt, store=trained.store, out=str(f / "ev"))
    assert f.read_text() == "x"


def test_results_carry_the_alignment_forms_and_the_boundary_distance(trained, tmp_path):
    """results.alignments: four named forms with mean and median; results.boundary: FAB's
    L2 and L∞ summaries on the first --boundary-samples images, equal to the primitive's."""
    from trainer.attacks.boundary import min_norm_distance
    from trainer.checkpoint import load_model

    out = tmp_path / "ev"
    _ok(_sat(_eval_args(trained, out, "--store", trained.store, "--split", "train",
                        "--attacks", "pgd5", "--eps", "4", "--max-samples", "24",
                        "--boundary-samples", "10", "--batch-size", "8", "--quiet")))
    r = json.loads((out / "results.json").read_text())["results"]
    assert set(r["alignments"]) == {"logit_projection", "logit_cosine", "margin_projection",
                                    "margin_cosine"}
    assert r["alignments"]["logit_projection"]["mean"] == pytest.approx(r["alignment"], rel=1e-5)
    for v in r["alignments"].values():
        assert v["mean"] > 0 and v["median"] > 0
    assert 0 < r["alignments"]["logit_cosine"]["mean"] <= 1
    b = r["boundary"]
    assert b["attack"] == "fab" and b["n"] == 10 and b["steps"] == 20
    for norm in ("l2", "linf"):
        assert set(b[norm]) == {"median", "median_correct", "not_found", "misclassified"}
        assert 0 <= b[norm]["not_found"] <= 1
    assert b["l2"]["median"] >= b["linf"]["median"]  # ||δ||_2 >= ||δ||_∞
    # The same numbers as the primitive on the same images, batch by batch.
    model, _ = load_model(trained.ckpt, "cpu")
    from saliency_cache.store import SaliencyStore

    split = SaliencyStore.open(trained.store, "r").split("train")
    x = torch.from_numpy(split.read_images(0, 10)).float() / 255
    y = torch.from_numpy(np.asarray(split.labels(), dtype=np.int64)[:10])
    d = torch.cat([min_norm_distance(model.eval(), x[s:s + 8], y[s:s + 8], norm="linf", steps=20,
                                     generator=torch.Generator().manual_seed(bi))
                   for bi, s in enumerate((0, 8))])
    assert b["linf"]["median"] == pytest.approx(float(np.median(d.numpy())))
    md = (out / "results.md").read_text()
    assert "| margin_projection |" in md and "boundary distance (FAB" in md
    # --no-boundary leaves it out; a bad sample cap is refused in one line.
    _ok(_sat(_eval_args(trained, tmp_path / "nb", "--store", trained.store, "--attacks",
                        "pgd5", "--eps", "1", "--max-samples", "8", "--quiet", "--no-boundary")))
    assert "boundary" not in json.loads((tmp_path / "nb" / "results.json").read_text())["results"]
    line = _error(_sat(_eval_args(trained, tmp_path / "bad", "--store", trained.store,
                                  "--boundary-samples", "0")))
    assert "boundary samples must be an integer >= 1, got 0" in line
    assert not (tmp_path / "bad").exists()
