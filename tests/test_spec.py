"""Experiment spec files: the shipped presets parse, and bad specs are refused with one line
that quotes the offending key or value (nothing is created)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.spec import list_presets, load_spec, preset_path

PRESETS = ("cifar10", "cifar10-maps", "companions", "demo", "flowers", "tiny")

GOOD = """\
title: t
data:
  dataset: synthetic
  options: {n: 64, n_val: 32, image_size: 16, num_classes: 4}
width: 4
seeds: [0, 1]
teachers:
  - {name: adv, mode: adversarial, epochs: 1, methods: [gbp]}
weak: [mask]
student_epochs: 1
students:
  - {name: original, mode: standard}
  - {name: sat, mode: sat, maps: [adv/gbp], baseline: original, options: {sat_eps: 4}}
eval: {attacks: [pgd5], eps: [1, 2], samples: 16, autoattack: null}
variants:
  big: {width: 16, eval: {samples: 32}}
"""


def _spec(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_presets_are_shipped_and_parse_with_their_full_variants():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        cfg = load_spec(preset_path(name), overrides={"data": {"root": "."}})
        assert cfg.students and cfg.seeds
        if name != "demo":
            full = load_spec(preset_path(name), variant="full", overrides={"data": {"root": "."}})
            assert full.width == 64 and len(full.seeds) >= 5
    demo = load_spec(preset_path("demo"))
    assert len(demo.seeds) == 2 and [s.name for s in demo.students] == [
        "original", "sat-teacher", "sat-mask", "pgd", "pgd-sat"]
    # Shipped as package data, so `pip install` carries them.
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'pipelines = ["specs/*.yaml"]' in pyproject


def test_a_spec_parses_into_the_experiment_config(tmp_path):
    cfg = load_spec(_spec(tmp_path, GOOD), out=str(tmp_path / "x"))
    assert cfg.out == str(tmp_path / "x") and cfg.seeds == (0, 1) and cfg.width == 4
    assert cfg.teachers[0].name == "adv" and cfg.teachers[0].methods == ("gbp",)
    sat = cfg.students[1]
    assert sat.maps == ("adv/gbp",) and sat.baseline == "original"
    assert dict(sat.options) == {"sat_eps": pytest.approx(4 / 255)}  # /255 in a spec
    assert cfg.eval.autoattack is None and cfg.eval.eps == (1.0, 2.0)
    assert cfg.eval.boundary == (100, 20)  # FAB on the first 100 images, 20 steps
    for text, want in (("boundary: null", None), ("boundary: {samples: 8}", (8, 20)),
                       ("boundary: {samples: null, steps: 5}", (None, 5))):
        spec = GOOD.replace("autoattack: null}", f"autoattack: null, {text}}}")
        assert load_spec(_spec(tmp_path, spec)).eval.boundary == want, text
    big = load_spec(_spec(tmp_path, GOOD), variant="big")
    assert big.width == 16 and big.eval.samples == 32 and big.eval.eps == (1.0, 2.0)


# (how the text changes GOOD, the text, what the error line must quote)
BAD = [
    ("append", "colour: red\n", "unknown key 'colour' in spec"),
    ("student", "  - {name: a, mode: standard, colour: red}\n", "unknown key 'colour' in students[2]"),
    ("eval", "eval: {attacks: [pgd5], eps: [1, 2], samples: 16, autoattack: {eps: 8, n: 3}}\n",
     "unknown key 'n' in eval.autoattack"),
    ("append", "width: 8\n", "key 'width' is given twice"),
    ("replace", "width: eight\n", "spec.width: 'eight' is not an integer"),
    ("append", "sat_reach_fraction: high\n", "spec.sat_reach_fraction: 'high' is not a number or null"),
    ("replace", "seeds: [0, 0]\n", "repeats a seed"),
    ("append", "data: {dataset: nope}\n", "key 'data' is given twice"),
    ("student", "  - {name: x, mode: sta}\n", "unknown training mode 'sta'"),
    ("student", "  - {name: x, mode: sat, maps: [std/gbp]}\n", "uses map 'std/gbp'"),
    ("student", "  - {name: x, mode: sat, maps: [mask], baseline: nobody}\n", "baseline 'nobody'"),
    ("student", "  - {name: original, mode: pgd}\n", "student name 'original' is used twice"),
    ("student", "  - {name: x, mode: pgd, options: {mix_q: 1}}\n", "unknown key 'mix_q'"),
    ("student", "  - {name: x, mode: pgd, options: {eps: -3}}\n", "eps must be in [0, 1]"),
    ("eval", "eval: {attacks: [pgd7x], eps: [1]}\n", "pgd7x"),
    ("eval", "eval: {eps: [1, -2]}\n", "eval.eps: -2"),
    ("eval", "eval: {boundary: {samples: 8, norm: l2}}\n", "unknown key 'norm' in eval.boundary"),
    ("eval", "eval: {boundary: {steps: many}}\n", "'many' is not an integer"),
]


def _bad_text(how: str, extra: str) -> str:
    if how == "append":
        return GOOD + extra
    if how == "replace":
        key = extra.split(":")[0] + ":"
        return "".join(extra if ln.startswith(key) else ln for ln in GOOD.splitlines(True))
    if how == "student":
        return GOOD.replace("eval:", extra + "eval:", 1)
    return "".join(extra if ln.startswith("eval:") else ln for ln in GOOD.splitlines(True))


@pytest.mark.parametrize(("how", "extra", "quoted"), BAD)
def test_bad_specs_are_refused_with_the_key_quoted(tmp_path, how, extra, quoted):
    spec = _spec(tmp_path, _bad_text(how, extra))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compare", "--spec", str(spec), "--out", str(out)])
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: spec ") and quoted in lines[0], lines
    assert not out.exists()


def test_duplicate_key_error_names_both_lines(tmp_path):
    spec = _spec(tmp_path, GOOD.replace("width: 4\n", "width: 4\nbatch_size: 8\nwidth: 5\n"))
    with pytest.raises(Exception, match=r"key 'width' is given twice \(line 5 and line 7\)"):
        load_spec(spec)


@pytest.mark.parametrize(("args", "quoted"), [
    (["--variant", "huge"], "no variant 'huge'"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
])
def test_bad_command_line_choices(tmp_path, args, quoted):
    res = CliRunner().invoke(main, ["compare", "--spec", str(_spec(tmp_path, GOOD)),
                                    "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and quoted in res.stderr, res.stderr


def test_spec_and_preset_are_exclusive(tmp_path):
    res = CliRunner().invoke(main, ["compare", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "exactly one of --spec FILE or --preset NAME" in res.stderr
    res = CliRunner().invoke(main, ["compare", "--preset", "tiny", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "needs --data-root" in res.stderr
