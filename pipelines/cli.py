"""The ``sat`` command: a thin click front end. Each command builds a config and calls a library ``run``.

User errors (:class:`saliency_cache.errors.SatError`) become a one-line message on stderr and
exit code 2; click's own usage errors also exit 2. ``--config FILE`` (YAML) supplies defaults
for any command's options; flags given on the command line override it.

Names and defaults are the library's, so each is written once (the option machinery is in
:mod:`pipelines.cli_options`): choices list the tuples the library validates against, and
defaults are the stage configs' dataclass defaults, read only when click needs them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from pipelines.cli_options import (
    COMPARE,
    EVAL,
    PERTURB,
    PRECOMPUTE,
    TEACHER,
    TRAIN,
    Choice,
    Default,
    build_data_spec,
    build_loop,
    config_option,
    csv_values,
    data_options,
    echo_result,
    loop_options,
    partial_advice,
    per255,
)
from pipelines.common import tune_allocator
from saliency_cache.cli import (
    ErrorReportingGroup,
    cache,
    parse_storage_options,
)
from saliency_cache.errors import IncompleteMapError, SatError
from trainer.data.weak import WEAK_SOURCES


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sat-pipeline")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Saliency-based adversarial training: precompute saliency maps into a store, train, evaluate."""
    _one_process_unless_training(ctx.invoked_subcommand)
    tune_allocator()
    _quiet_progress_in_logs()


_SINGLE_PROCESS = ("teacher", "precompute", "eval", "report", "demo", "compare")


def _one_process_unless_training(command: str | None) -> None:
    """Only ``sat train`` runs data-parallel. The other stages, started by torchrun, would run
    the whole job once per rank, every copy writing the same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if command in _SINGLE_PROCESS and world.isdigit() and int(world) > 1:
        raise SatError(
            f"`sat {command}` runs in one process, but WORLD_SIZE={world} (torchrun?); "
            "only `sat train` runs under torchrun (precompute parallelises with --workers)"
        )


def _quiet_progress_in_logs() -> None:
    """When stderr is not a terminal (CI, nohup, a pipe into a file), redraw progress bars at
    most every 30 s instead of ten times a second: a log then gets a line of progress now
    and then, not megabytes of carriage returns. tqdm reads ``TQDM_*`` defaults when it is
    first imported, which the commands do lazily; a value the user set is kept."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


# ---- commands ------------------------------------------------------------------------------
@main.command()
@config_option
@data_options()
@loop_options(TEACHER)
@click.option("--arch", type=str, default=Default(TEACHER + "arch"), show_default=True,
              help="Model architecture.")
@click.option("--width", type=int, default=Default(TEACHER + "width"), show_default=True,
              help="Width of the first stage.")
@click.option("--mode", "teacher_mode", type=Choice("saliency_cache.store:TEACHER_MODES"),
              default=Default(TEACHER + "mode"), show_default=True)
@click.option("--sparsity", type=float, default=Default(TEACHER + "sparsity"), show_default=True)
@click.option("--prune-steps", type=int, default=Default(TEACHER + "prune_steps"), show_default=True)
@click.option("--finetune-epochs", type=int, default=Default(TEACHER + "finetune_epochs"),
              show_default=True)
@click.option("--val-split", type=str, default=Default(TEACHER + "val_split"), show_default=True,
              help="'' to skip validation.")
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run in --out (each phase from its last checkpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def teacher(**kw: Any) -> None:
    """Train a teacher (standard, PGD-adversarial or 95 %-sparse) for precompute."""
    from pipelines.common import check_out_dir, resolve_device
    from pipelines.teacher import TeacherConfig, run

    check_out_dir(kw["out"])
    data = build_data_spec(kw)
    loop = build_loop(kw)
    cfg = TeacherConfig(
        data=data, out=kw["out"], arch=kw["arch"], width=kw["width"], mode=kw["teacher_mode"],
        loop=loop, batch_size=kw["batch_size"], sparsity=kw["sparsity"],
        prune_steps=kw["prune_steps"], finetune_epochs=kw["finetune_epochs"],
        val_split=kw["val_split"] or None, device=resolve_device(kw["device"]),
        resume=kw["resume"],
    )
    res = run(cfg)
    m = res["metrics"]
    human = (f"teacher saved to {res['checkpoint']} (val acc {m.get('val_acc', float('nan')):.4f}"
             + (f", sparsity {res['sparsity']:.4f}" if res["sparsity"] is not None else "") + ")")
    echo_result(res, kw["as_json"], human)


@main.command()
@config_option
@data_options()
@click.option("--store", required=True, help="Store path or URL (created if missing).")
@click.option("--splits", type=str, default=Default(PRECOMPUTE + "splits"), show_default=True,
              help="Splits to ingest.")
@click.option("--map-splits", type=str, default=Default(PRECOMPUTE + "map_splits"),
              show_default=True, help="Splits that get maps.")
@click.option("--teacher", "teachers", multiple=True, type=click.Path(),
              help="Teacher checkpoint, timm:<model>@<weights.safetensors>, torchvision:<model>@<...> "
                   "or a .json/.yaml teacher file (repeatable).")
@click.option("--cam-layer", default=None,
              help="Module Grad-CAM explains in timm/torchvision teachers (default: per family).")
@click.option("--method", "methods", type=str, default=Default(PRECOMPUTE + "methods"),
              show_default=True, help="Comma-separated saliency methods run on every teacher.")
@click.option("--weak", type=str, default=Default(PRECOMPUTE + "weak"),
              help=f"Weak saliency from annotations: {', '.join(WEAK_SOURCES)} (comma-separated).")
@click.option("--target", "target_rule", type=Choice("saliency_cache.store:TARGET_RULES"),
              default=Default(PRECOMPUTE + "target_rule"), show_default=True,
              help="Saliency target: ground-truth label (paper) or teacher argmax (authors' code).")
@click.option("--quantile", type=float, default=Default(PRECOMPUTE + "quantile"), show_default=True,
              help="Zero attributions below this per-image |quantile|.")
@click.option("--heat-threshold", type=float, default=Default(PRECOMPUTE + "heat_threshold"),
              show_default=True)
@click.option("--no-images", is_flag=True, help="Do not store images (training then needs --dataset).")
@click.option("--chunk-size", type=int, default=Default(PRECOMPUTE + "chunk_size"), show_default=True)
@click.option("--shard-chunks", type=int, default=None, help="Chunks per shard file.")
@click.option("--batch-size", type=int, default=Default(PRECOMPUTE + "batch_size"), show_default=True)
@click.option("--workers", type=int, default=Default(PRECOMPUTE + "workers"), show_default=True,
              help="Local dask workers.")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler.")
@click.option("--threads-per-worker", type=int, default=Default(PRECOMPUTE + "threads_per_worker"),
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (maps are byte-identical only on the same device type).")
@click.option("--seed", type=int, default=Default(PRECOMPUTE + "seed"), show_default=True)
@click.option("--quiet", is_flag=True)
@click.option("--overwrite", is_flag=True,
              help="Replace maps of the same name that were computed with other settings.")
@click.option("--json", "as_json", is_flag=True)
def precompute(**kw: Any) -> None:
    """Write dataset splits and saliency maps (teachers and/or boxes/masks) into a store."""
    from pipelines.common import resolve_device
    from pipelines.precompute import PrecomputeConfig, run

    data = build_data_spec(kw)
    cfg = PrecomputeConfig(
        store=kw["store"], data=data, splits=csv_values(kw["splits"]), map_splits=csv_values(kw["map_splits"]),
        with_images=not kw["no_images"], teachers=tuple(kw["teachers"]), cam_layer=kw["cam_layer"],
        methods=csv_values(kw["methods"]) if kw["teachers"] else (), weak=csv_values(kw["weak"]),
        target_rule=kw["target_rule"], quantile=kw["quantile"], heat_threshold=kw["heat_threshold"],
        chunk_size=kw["chunk_size"], shard_chunks=kw["shard_chunks"], batch_size=kw["batch_size"],
        workers=kw["workers"], scheduler=kw["scheduler"], threads_per_worker=kw["threads_per_worker"],
        device=resolve_device(kw["device"]), seed=kw["seed"], show_progress=not kw["quiet"],
        overwrite=kw["overwrite"],
    )
    res = run(cfg)
    names = ", ".join(f"{m['split']}/{m['name']}" for m in res["maps"]) or "no maps"
    echo_result(res, kw["as_json"], f"store {cfg.store}: {names} complete "
                 f"({res['chunks_written']} chunks written in {res['seconds']:.1f}s)")


@main.command()
@config_option
@data_options(required=False)
@loop_options(TRAIN)
@click.option("--store", required=True, help="Store path or URL.")
@click.option("--map", "maps", multiple=True, help="Cached map to stream (repeatable; several for multi-sat).")
@click.option("--mode", type=str, default=Default(TRAIN + "mode"), show_default=True,
              help="Training mode (see `sat list modes`).")
@click.option("--split", type=str, default=Default(TRAIN + "split"), show_default=True)
@click.option("--val-split", type=str, default=Default(TRAIN + "val_split"), show_default=True,
              help="'' to skip validation.")
@click.option("--arch", type=str, default=Default(TRAIN + "arch"), show_default=True)
@click.option("--width", type=int, default=Default(TRAIN + "width"), show_default=True)
@click.option("--eps", type=float, default=Default(PERTURB + "eps", per=255), show_default=True,
              help="Training budget of PGD/TRADES/FGSM-RS (/255).")
@click.option("--sat-eps", type=float, default=Default(PERTURB + "sat_eps", per=255),
              show_default=True, help="SAT ε0 (/255).")
@click.option("--sat-alpha", type=float, default=Default(PERTURB + "sat_alpha"), show_default=True,
              help="SAT α (random-direction decay).")
@click.option("--sat-reach", type=float, default=None,
              help="Express the SAT schedule against run length: α^t reaches 0.6 at this fraction of training.")
@click.option("--mix-p", type=float, default=Default(PERTURB + "mix_p"), show_default=True,
              help="P(SAT branch) for pgd-sat / trades-sat.")
@click.option("--trades-beta", type=float, default=Default(PERTURB + "trades_beta"), show_default=True)
@click.option("--pgd-steps", type=int, default=Default(PERTURB + "pgd_steps"), show_default=True)
@click.option("--pgd-step-size", type=float, default=Default(PERTURB + "pgd_step_size", per=255),
              show_default=True, help="PGD/TRADES step (/255).")
@click.option("--trades-steps", type=int, default=Default(PERTURB + "trades_steps"), show_default=True)
@click.option("--uniform-eps", type=float, default=Default(PERTURB + "uniform_eps", per=255),
              show_default=True, help="Uniform-noise budget (/255).")
@click.option("--fgsm-alpha", type=float, default=Default(PERTURB + "fgsm_rs_alpha", per=255),
              show_default=True, help="FGSM-RS step (/255).")
@click.option("--gradnorm-lambda", type=float, default=Default(PERTURB + "gradnorm_lambda"),
              show_default=True, help="gradnorm: weight of mean ||grad_x CE||^2 (x in [0, 1] pixels).")
@click.option("--sgt-fraction", type=float, default=Default(PERTURB + "sgt_fraction"),
              show_default=True,
              help="sgt: fraction of input features masked (smallest |gradient|), in (0, 1).")
@click.option("--sgt-fill", type=str, default=Default(PERTURB + "sgt_fill"), show_default=True,
              help="sgt: masked values, 'uniform' (image's range) or 'channel-mean'.")
@click.option("--sgt-lambda", type=float, default=Default(PERTURB + "sgt_lambda"),
              show_default=True, help="sgt: weight of the KL term.")
@click.option("--workers", type=int, default=Default(TRAIN + "workers"), show_default=True,
              help="DataLoader worker processes.")
@click.option("--out", required=True, type=click.Path(), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from <out>/checkpoints/last.safetensors.")
@click.option("--allow-partial", is_flag=True, help="Train on maps whose precompute is unfinished.")
@click.option("-o", "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote store (repeatable; VALUE may be JSON).")
@click.option("--json", "as_json", is_flag=True)
def train(**kw: Any) -> None:
    """Train a student (SAT, PGD-SAT, TRADES-SAT or a baseline) from a store."""
    from pipelines.common import check_out_dir, resolve_device
    from pipelines.train import TrainConfig, run
    from trainer.perturb import PerturbConfig

    check_out_dir(kw["out"])
    data = build_data_spec(kw)
    loop = build_loop(kw)
    px = {name: per255(kw, name) for name in
          ("eps", "sat_eps", "pgd_step_size", "uniform_eps", "fgsm_alpha")}
    perturb = PerturbConfig(
        eps=px["eps"], sat_eps=px["sat_eps"], sat_alpha=kw["sat_alpha"],
        mix_p=kw["mix_p"], trades_beta=kw["trades_beta"], pgd_steps=kw["pgd_steps"],
        pgd_step_size=px["pgd_step_size"], trades_steps=kw["trades_steps"],
        uniform_eps=px["uniform_eps"], fgsm_rs_alpha=px["fgsm_alpha"],
        gradnorm_lambda=kw["gradnorm_lambda"], sgt_fraction=kw["sgt_fraction"],
        sgt_fill=kw["sgt_fill"], sgt_lambda=kw["sgt_lambda"],
    )
    cfg = TrainConfig(
        store=kw["store"], out=kw["out"], mode=kw["mode"], maps=tuple(kw["maps"]), split=kw["split"],
        val_split=kw["val_split"] or None, data=data, arch=kw["arch"], width=kw["width"],
        batch_size=kw["batch_size"], loop=loop, perturb=perturb, sat_reach_fraction=kw["sat_reach"],
        workers=kw["workers"], device=resolve_device(kw["device"]), resume=kw["resume"],
        allow_partial=kw["allow_partial"], storage_options=parse_storage_options(kw["storage_option"]),
    )
    try:
        res = run(cfg)
    except IncompleteMapError as e:
        raise partial_advice(e, "pass --allow-partial") from None
    f = res["final"]
    echo_result(res, kw["as_json"], f"run {res['run_dir']}: epoch {f.get('epoch')} "
                 f"val_acc={f.get('val_acc', float('nan')):.4f} "
                 f"val_robust_acc={f.get('val_robust_acc', float('nan')):.4f}")


@main.command(name="eval")
@config_option
@data_options(required=False)
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint to attack.")
@click.option("--store", default=None, help="Evaluate on this store's split (or give --dataset).")
@click.option("--split", type=str, default=Default(EVAL + "split"), show_default=True)
@click.option("--attacks", type=str, default=Default(EVAL + "attacks"), show_default=True,
              help="Comma-separated attacks (see `sat list attacks`).")
@click.option("--eps", type=str, default=Default(EVAL + "eps"), show_default=True,
              help="Budgets in /255 units.")
@click.option("--uniform-eps", type=str, default=Default(EVAL + "uniform_eps"), show_default=True,
              help="Uniform-noise budgets (/255).")
@click.option("--map", default=None, help="Cached map for the saliency-map attack.")
@click.option("--max-samples", type=int, default=None)
@click.option("--batch-size", type=int, default=Default(EVAL + "batch_size"), show_default=True)
@click.option("--no-alignment", is_flag=True)
@click.option("--no-boundary", is_flag=True, help="Skip the FAB boundary distance (slow on CPU).")
@click.option("--boundary-samples", type=int, default=Default(EVAL + "boundary_samples"), show_default=True,
              help="Images (the first N evaluated) whose boundary distance is measured.")
@click.option("--boundary-steps", type=int, default=Default(EVAL + "boundary_steps"), show_default=True, help="FAB iterations.")
@click.option("-o", "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote store (repeatable; VALUE may be JSON).")
@click.option("--arch", "expect_arch", default=None, help="Refuse a checkpoint of another architecture.")
@click.option("--out", default=None, type=click.Path(), help="Output directory (default <run>/eval).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=Default(EVAL + "seed"), show_default=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(**kw: Any) -> None:
    """Attack a checkpoint: PGD-k, TRADES, uniform noise, saliency (and AutoAttack)."""
    from pipelines.common import resolve_device
    from pipelines.evaluate import EvalConfig, results_markdown, run

    data = build_data_spec(kw)
    cfg = EvalConfig(
        checkpoint=kw["checkpoint"], out=kw["out"], attacks=csv_values(kw["attacks"]),
        eps=csv_values(kw["eps"], float), uniform_eps=csv_values(kw["uniform_eps"], float), store=kw["store"],
        data=data, split=kw["split"], map=kw["map"], max_samples=kw["max_samples"],
        batch_size=kw["batch_size"], alignment=not kw["no_alignment"], expect_arch=kw["expect_arch"],
        boundary=not kw["no_boundary"], boundary_samples=kw["boundary_samples"],
        boundary_steps=kw["boundary_steps"],
        device=resolve_device(kw["device"]), seed=kw["seed"], show_progress=not kw["quiet"],
        storage_options=parse_storage_options(kw["storage_option"]),
    )
    try:
        res = run(cfg)
    except IncompleteMapError as e:  # eval has no --allow-partial: attacks need whole maps
        raise partial_advice(e, "run the same `sat precompute` again (it resumes)") from None
    echo_result(res, kw["as_json"], results_markdown(res))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory for tables and plots.")
@click.option("--title", type=str, default=Default("pipelines.report:ReportConfig.title"),
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def report(runs: tuple[str, ...], out: str, title: str, as_json: bool) -> None:
    """Aggregate evaluated runs into the paper's tables (markdown, CSV) and plots (PNG)."""
    from pipelines.report import ReportConfig, run

    res = run(ReportConfig(runs=runs, out=out, title=title))
    echo_result(res, as_json, (open(f"{out}/report.md").read()))


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--workers", type=int, default=Default(COMPARE + "workers"), show_default=True,
              help="Dask workers for precompute.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, device: str, workers: int, quiet: bool) -> None:
    """The whole pipeline on synthetic shapes: the ``demo`` preset (teachers, precompute,
    5 students x 2 seeds, eval, report with intervals and claims)."""
    from dataclasses import replace

    from pipelines.common import resolve_device
    from pipelines.compare import run
    from pipelines.spec import load_spec, preset_path

    cfg = load_spec(preset_path("demo"), out=out, overrides={"workers": workers})
    res = run(replace(cfg, device=resolve_device(device), show_progress=not quiet))
    click.echo(open(f"{out}/report/report.md").read())
    click.echo(f"demo finished in {res['seconds']:.0f}s; tables, plots and overlays in {out}/")


def _preset_names() -> list[str]:
    from pipelines.spec import list_presets

    return list_presets()


@main.command()
@click.option("--spec", "spec_file", default=None, type=click.Path(),
              help="Experiment spec (YAML): data, teachers, maps, students, seeds, attacks.")
@click.option("--preset", type=click.Choice(_preset_names()), default=None,
              help="A shipped spec (pipelines/specs/NAME.yaml).")
@click.option("--variant", default=None, help="A variant of the spec, e.g. full (the paper's scale).")
@click.option("--data-root", default=None, type=click.Path(), help="Dataset folder (spec's data.root).")
@click.option("--out", required=True, type=click.Path())
@click.option("--seeds", default=None, help="Comma-separated seeds (the spec's otherwise), e.g. 0,1,2.")
@click.option("--epochs", type=int, default=None, help="Student epochs (the spec's otherwise).")
@click.option("--teacher-epochs", type=int, default=None, help="Epochs of every teacher.")
@click.option("--width", type=int, default=None)
@click.option("--max-per-class", type=int, default=None,
              help="Keep the first N images of each class (the spec's data.options.max_per_class).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (the spec's otherwise).")
@click.option("--workers", type=int, default=None, help="Dask workers for precompute.")
@click.option("--parallel", type=int, default=None,
              help="Student runs trained at once, one process each (default: the spec's, 1).")
@click.option("--quiet", is_flag=True)
def compare(spec_file: str | None, preset: str | None, variant: str | None,
            data_root: str | None, out: str, seeds: str | None, epochs: int | None,
            teacher_epochs: int | None, width: int | None, max_per_class: int | None,
            device: str | None, workers: int | None, parallel: int | None, quiet: bool) -> None:
    """Run a whole experiment (teachers -> precompute -> students x seeds -> eval -> report).

    A rerun in the same --out skips every finished run and resumes interrupted ones.
    """
    from dataclasses import replace

    from pipelines.common import resolve_device
    from pipelines.compare import run
    from pipelines.spec import load_spec, preset_path

    if (spec_file is None) == (preset is None):
        raise SatError("give exactly one of --spec FILE or --preset NAME")
    over: dict[str, Any] = {}
    for key, val in (("student_epochs", epochs), ("width", width), ("workers", workers),
                     ("parallel", parallel), ("device", device)):
        if val is not None:
            over[key] = val
    if seeds is not None:
        try:
            over["seeds"] = [int(x) for x in seeds.split(",")]
        except ValueError:
            raise SatError(f"--seeds {seeds!r} is not a comma-separated list of integers") from None
    data: dict[str, Any] = {}
    if data_root is not None:
        data["root"] = data_root
    if max_per_class is not None:
        data["options"] = {"max_per_class": max_per_class}
    if data:
        over["data"] = data
    cfg = load_spec(spec_file or preset_path(preset), variant=variant, out=out, overrides=over)
    if teacher_epochs is not None:
        cfg = replace(cfg, teachers=tuple(replace(t, epochs=teacher_epochs) for t in cfg.teachers))
    res = run(replace(cfg, device=resolve_device(cfg.device), show_progress=not quiet))
    click.echo(open(f"{out}/report/report.md").read())
    click.echo(f"finished in {res['seconds']:.0f}s; outputs in {out}/")


@main.command(name="list")
@click.argument("what", type=click.Choice(["models", "methods", "modes", "attacks", "datasets"]))
def list_cmd(what: str) -> None:
    """List registered models, saliency methods, training modes, attacks or datasets."""
    if what == "models":
        from trainer.teachers import list_teacher_sources

        def f():
            from trainer.models import list_models

            return list_models() + list_teacher_sources()
    elif what == "methods":
        from trainer.saliency import list_methods as f
    elif what == "modes":
        from trainer.perturb import list_modes as f
    elif what == "attacks":
        from trainer.attacks import list_attacks as f
    else:
        from trainer.data import list_datasets as f
    click.echo("\n".join(f()))


main.add_command(cache)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
