"""The ``sat`` command's shared machinery: option groups, values read from the library, and
the small parsers the commands share (:mod:`pipelines.cli` holds the commands).

Names and defaults are the library's, so each is written once: a choice lists a tuple the
library validates against (``TARGET_RULES``, ``TEACHER_MODES``, ...; :class:`Choice`), and an
option's default is its stage config's dataclass default (:class:`Default`). Both are read
when click needs them (parsing that command, or its ``--help``), so ``sat --help`` and
``sat cache ...`` start without loading torch or zarr.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from typing import Any

import click

from saliency_cache.cli import parse_key_values
from saliency_cache.errors import IncompleteMapError, SatError
from trainer.data import list_datasets


# ---- values read from the library ---------------------------------------------------------
def library_value(ref: str) -> Any:
    """The object ``"package.module:Name.attr"`` names, e.g. a dataclass field's default
    ``"trainer.loop:LoopConfig.epochs"`` (a dataclass keeps plain defaults as class attributes)."""
    module, _, path = ref.partition(":")
    value: Any = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    return value


class Default:
    """A click default read from the library when click needs it (see the module docstring).

    ``per`` scales the value to the option's unit (budgets are [0, 1] pixel units in the
    configs and /255 units on the command line); a tuple becomes the comma-separated string
    the option takes. click calls the object for the default and prints ``str()`` of it in
    ``--help``.
    """

    def __init__(self, ref: str, per: float = 1.0) -> None:
        self.ref, self.per = ref, per

    def __call__(self) -> Any:
        value = library_value(self.ref)
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        if self.per != 1.0:
            # Rounded: (x / 255) * 255 need not give back x exactly in floats (x = 63.9 does
            # not), and the command divides by 255 again.
            return round(value * self.per, 9)
        return value

    def __str__(self) -> str:
        return str(self())


class Choice(click.Choice):
    """A ``click.Choice`` over a tuple the library defines, imported when click first needs it."""

    def __init__(self, ref: str) -> None:  # no super().__init__: ``choices`` is the property
        self.ref, self.case_sensitive = ref, True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(library_value(self.ref))


LOOP = "trainer.loop:LoopConfig."
TEACHER = "pipelines.teacher:TeacherConfig."
PRECOMPUTE = "pipelines.precompute:PrecomputeConfig."
TRAIN = "pipelines.train:TrainConfig."
PERTURB = "trainer.perturb:PerturbConfig."
EVAL = "pipelines.evaluate:EvalConfig."
COMPARE = "pipelines.compare:CompareConfig."


# ---- shared option groups ------------------------------------------------------------------
def _config_keys(ctx: click.Context) -> tuple[dict[str, str], list[str]]:
    """Config-file keys of a command: {key: parameter name}, and the option names to list.

    Keys are option names with underscores (``chunk_size`` for --chunk-size, ``method`` for
    --method); the parameter name an option fills (``methods``) is accepted too.
    """
    names: dict[str, str] = {}
    shown: list[str] = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name == "config":
            continue
        names[p.name] = p.name
        for opt in (*p.opts, *p.secondary_opts):
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = p.name
                shown.append(opt[2:])
    return names, sorted(shown)


def _load_config_file(ctx: click.Context, _param, value):
    # Raised as SatError (not click.BadParameter) so a bad config file gets the one-line
    # `error: ...` of every other user error; ErrorReportingGroup catches it while parsing the command.
    if value:
        from pipelines.common import load_yaml_defaults

        defaults = load_yaml_defaults(value)
        names, shown = _config_keys(ctx)
        unknown = sorted(set(defaults) - set(names))
        if unknown:
            raise SatError(
                f"unknown keys in config file {value}: {', '.join(unknown)}; "
                f"valid: {', '.join(shown)}"
            )
        mapped: dict[str, Any] = {}
        for key, v in defaults.items():
            if names[key] in mapped:
                raise SatError(f"config file {value} sets option {names[key]!r} twice")
            mapped[names[key]] = v
        ctx.default_map = {**(ctx.default_map or {}), **mapped}
    return value


def config_option(f: Callable) -> Callable:
    return click.option(
        "--config", type=click.Path(dir_okay=False), callback=_load_config_file, is_eager=True,
        expose_value=False, help="YAML file of option defaults (keys are option names).",
    )(f)


def data_options(required: bool = True) -> Callable:
    def deco(f: Callable) -> Callable:
        opts = [
            click.option("--dataset", required=required, default=None,
                         help=f"Dataset: {', '.join(list_datasets())}."),
            click.option("--data-root", type=click.Path(), default=None, help="Dataset folder."),
            click.option("--image-size", type=int, default=None, help="Resize images to this size."),
            click.option("--max-per-class", type=int, default=None, help="Take the first K images per class."),
            click.option("--n", "n_samples", type=int, default=None, help="Training samples (synthetic)."),
            click.option("--n-val", type=int, default=None, help="Validation samples (synthetic; default --n)."),
            click.option("--num-classes", type=int, default=None, help="Classes (synthetic)."),
            click.option("--data-seed", type=int, default=None, help="Generator seed (synthetic)."),
            click.option("--data-option", multiple=True, metavar="KEY=VALUE",
                         help="Any other dataset option (repeatable), e.g. foreground=1."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def build_data_spec(kw: dict[str, Any]):
    from pipelines.common import DataSpec

    name = kw.pop("dataset")
    root = kw.pop("data_root")
    opts: dict[str, Any] = {}
    for key, opt in (("image_size", "image_size"), ("max_per_class", "max_per_class"),
                     ("n_samples", "n"), ("n_val", "n_val"), ("num_classes", "num_classes"),
                     ("data_seed", "seed")):
        v = kw.pop(key)
        if v is not None:
            opts[opt] = v
    for k, v in parse_key_values(kw.pop("data_option"), "--data-option").items():
        opts[k.replace("-", "_")] = v
    if name is None:
        return None
    return DataSpec(name=name, root=root, options=opts)


def loop_options(stage: str) -> Callable:
    """Options of :class:`trainer.loop.LoopConfig`, and ``--batch-size`` from ``stage``
    (the prefix of the stage config's fields, e.g. ``TRAIN``)."""

    def deco(f: Callable) -> Callable:
        opts = [
            click.option("--epochs", type=int, default=Default(LOOP + "epochs"), show_default=True),
            click.option("--optimizer", type=Choice("trainer.loop:OPTIMIZERS"),
                         default=Default(LOOP + "optimizer"), show_default=True),
            click.option("--lr", type=float, default=Default(LOOP + "lr"), show_default=True),
            click.option("--momentum", type=float, default=Default(LOOP + "momentum"), show_default=True),
            click.option("--weight-decay", type=float, default=Default(LOOP + "weight_decay"),
                         show_default=True),
            click.option("--schedule", type=Choice("trainer.loop:SCHEDULES"),
                         default=Default(LOOP + "schedule"), show_default=True),
            click.option("--crop-padding", type=int, default=Default(LOOP + "crop_padding"),
                         show_default=True),
            click.option("--no-flip", is_flag=True, help="Disable horizontal flips."),
            click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA."),
            click.option("--seed", type=int, default=Default(LOOP + "seed"), show_default=True),
            click.option("--robust-val-samples", type=int, default=Default(LOOP + "robust_val_samples"),
                         show_default=True, help="Validation samples attacked (PGD-3, 2/255) each epoch."),
            click.option("--batch-size", type=int, default=Default(stage + "batch_size"), show_default=True),
            click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
            click.option("--quiet", is_flag=True, help="No progress bars."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def build_loop(kw: dict[str, Any]):
    from trainer.loop import LoopConfig

    return LoopConfig(
        epochs=kw.pop("epochs"), optimizer=kw.pop("optimizer"), lr=kw.pop("lr"),
        momentum=kw.pop("momentum"), weight_decay=kw.pop("weight_decay"),
        schedule=kw.pop("schedule"), crop_padding=kw.pop("crop_padding"),
        flip=not kw.pop("no_flip"), amp=not kw.pop("no_amp"), seed=kw.pop("seed"),
        robust_val_samples=kw.pop("robust_val_samples"), show_progress=not kw["quiet"],
    )


def csv_values(value: str | None, cast=str) -> tuple:
    if value is None or value == "":
        return ()
    out = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(cast(part))
        except ValueError:
            raise SatError(f"cannot read {part!r} in {value!r} as a {cast.__name__}") from None
    return tuple(out)


def per255(kw: dict[str, Any], name: str) -> float:
    """Option ``--<name>`` (in /255 units) as a pixel-unit float, checked as the user typed it:
    a bad value is quoted as given (``--eps -1``), not after the division (-0.0039)."""
    v = kw.pop(name)
    positive = name in ("pgd_step_size", "fgsm_alpha")  # a step of 0 would never move
    if not (math.isfinite(v) and (v > 0 if positive else v >= 0) and v <= 255):
        low = "(0" if positive else "[0"
        raise SatError(f"--{name.replace('_', '-')} must be in {low}, 255] (/255 units), got {v:g}")
    return v / 255


def partial_advice(e: IncompleteMapError, advice: str) -> IncompleteMapError:
    """The store's "pass allow_partial" (a library argument) as advice this command can take."""
    return IncompleteMapError(str(e).replace("pass allow_partial", advice))


def echo_result(result: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        from pipelines.common import to_jsonable

        click.echo(json.dumps(to_jsonable(result), indent=2, default=str))
    else:
        click.echo(human)
