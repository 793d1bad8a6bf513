"""Benchmark the precompute stage: guided backprop of a ResNet-10 into a store, against the
teacher's bare forward + backward, across dask worker counts, and against per-image saliency.

Setup: the synthetic shapes dataset (1,024 images of 32x32 by default) ingested once into a
store with its images; a ResNet-10 of width 32 (untrained: the cost of a pass does not depend
on the weights); chunks of 128 (8 chunks, so 8 shards and 8 dask tasks); ``sat precompute``'s
defaults otherwise (sub-batches of 64, one torch thread per worker, the allocator tuning the
``sat`` command applies). Width 32 sits between the tests' toy widths and the paper's 64: at
width 16 the fixed work per chunk (reading, thresholding, packing, writing) and guided
backprop's clamp of each ReLU output's gradient are a larger share of a pass, and the ratio
below measured 1.13-1.16 on this machine (1.16-1.23 with captum's hooks, which also cloned
every ReLU input).
Measured:

- ``precompute_over_raw_fwd_bwd``: an in-process ``pipelines.precompute.run`` on the ingested
  store, less its ingest phase (the run's ``seconds_ingest``: opening the dataset and checking
  the split's fingerprint against it), so planning, reading images from the store, GBP,
  thresholding, packing, writing and finalising; over a loop of forward + backward w.r.t. the
  input on the same batches of the same size (target <= 1.15). With a core to spare the run
  reads and writes the store on a second thread while the teacher computes, as ``sat
  precompute --workers 1`` does; the whole run's ratio, and its CPU-time ratio, are saved too;
- ``dask_2w_over_1w_speedup``: the same on a local dask cluster of 1 worker over one of 2
  workers, each worker one torch thread; cluster start-up (and the workers' first imports) is
  excluded, the client exists before the clock starts and precompute uses it. What two
  processes gain on this 2-vCPU VM is the machine's, not the code's: the bare teacher pass
  in two single-thread processes scaled 1.74-1.86x in 2026-11 and 1.58-1.96x from one run to
  the next on 2026-12-06, and this figure followed it (1.65-1.95). So the same workers also
  run ``bare_2w_over_1w_speedup`` after every precompute run: forward + backward passes of
  their share of the images, nothing else, all workers at once;
- ``dask_scaling_efficiency``: the first over the second, what dask, the store and the
  scheduling lose of the machine's own scaling (target >= 0.92; it replaces the absolute
  target of >= 1.7, which was set as "the 1.74-1.86x of two processes less a few percent");
- ``smoothgrad16_over_passes_x_raw``, ``ig32_over_passes_x_raw`` (targets <= 1.20), and
  Guided Grad-CAM++ (informative): an in-process precompute of that method on the first
  ``--method-n`` images, over its teacher passes per image (16 noisy copies, 32 path
  points, 2 for Guided Grad-CAM++ counted as guided backprop plus a Grad-CAM++ pass) times
  the bare forward + backward of the same images at the same batch of 64. Below 1.0 means
  the method needs fewer passes than it is charged for (Guided Grad-CAM++ shares one);
- ``speedup_vs_per_image_online``: saliency computed one image at a time (batch of 1, as the
  authors' training loop does) over the precompute, measured on a subset and scaled to N.

Every timing follows an untimed warm-up run and is repeated; the minimum is the headline
(the least disturbed run), medians, per-pair ratios and all samples are saved too. Other processes on the machine inflate wall-clock times and
flatten the dask speed-up, so the load average is recorded before and after.

    python bench/bench_precompute.py --out bench/results/precompute.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "precompute_over_raw_fwd_bwd": ("<=", 1.15),
    # dask's 2-worker speed-up over the bare passes' speed-up on the same workers: what dask,
    # the store and the scheduling lose of what the machine gives (1.7 / 1.74-1.86 when the
    # target was the absolute speed-up; see the docstring).
    "dask_scaling_efficiency": (">=", 0.92),
}
# Methods that cost several teacher passes per image: (method, its parameters, passes of
# forward + input-gradient backward per image). Their figure is precompute / (passes x raw).
METHODS = {
    "smoothgrad16": ("smoothgrad", {"nt_samples": 16}, 16),
    "ig32": ("ig", {"n_steps": 32}, 32),
    "guided-gradcam++": ("guided-gradcam++", {}, 2),
}
METHOD_TARGETS = {
    "smoothgrad16_over_passes_x_raw": ("<=", 1.20),
    "ig32_over_passes_x_raw": ("<=", 1.20),
}


def _versions() -> dict:
    import captum
    import dask
    import distributed
    import numcodecs
    import numpy as np
    import torch
    import zarr

    from saliency_cache.store import package_version

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "sat_pipeline": package_version(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _stats(samples: list[float]) -> dict:
    return {"min": min(samples), "median": statistics.median(samples), "samples": samples}


def _warm_worker() -> int:
    """Run on each dask worker before timing: the imports a first task would pay for."""
    import captum.attr  # noqa: F401
    import torch  # noqa: F401

    import pipelines.precompute  # noqa: F401
    import trainer.checkpoint  # noqa: F401
    import trainer.saliency  # noqa: F401

    return os.getpid()


def _bare_passes(teacher: str, n: int, batch_size: int, image_size: int, seed: int) -> float:
    """Run on a dask worker: seconds of forward + input-gradient backward passes of the
    teacher over ``n`` random images in batches, with no store, no dask task and no saliency
    method. Run on every worker of a cluster at once, it gives what the hardware scales to
    for this work, measured in the same processes as the precompute beside it."""
    import torch

    from trainer.checkpoint import load_model

    torch.set_num_threads(1)  # as a map task sets it
    net, _ = load_model(teacher, "cpu")
    g = torch.Generator().manual_seed(seed)
    x_all = torch.rand(n, 3, image_size, image_size, generator=g)
    logits = net(x_all[:1])
    y_all = torch.randint(0, logits.shape[1], (n,), generator=g)
    t0 = time.perf_counter()
    for s in range(0, n, batch_size):
        x = x_all[s : s + batch_size].requires_grad_(True)
        torch.autograd.grad(net(x).gather(1, y_all[s : s + batch_size, None]).sum(), x)
    return time.perf_counter() - t0


def time_methods(args, data, tmp: Path, cfg, run, net) -> dict[str, dict]:
    """Per method of :data:`METHODS`: an in-process precompute of that method on the first
    ``--method-n`` images (its maps phase, as the GBP headline), over ``passes`` times a
    plain forward + input-gradient backward of the same images at the same batch size,
    the two interleaved over ``--method-repeats`` repeats after an untimed warm-up."""
    import dataclasses

    import numpy as np
    import torch

    from trainer.saliency import create_method

    n, bs = min(args.method_n, args.n), args.batch_size
    sub = dataclasses.replace(data, options={**data.options, "n": n})
    base = tmp / "methods-ingested.zarr"
    run(dataclasses.replace(cfg(base, teachers=()), data=sub))
    ds = sub.open("train")
    x = torch.from_numpy(ds.load_images(0, n)).float().div_(255.0)
    y = torch.from_numpy(np.asarray(ds.labels(), dtype=np.int64))

    def raw() -> None:
        for s in range(0, n, bs):
            xb = x[s : s + bs].detach().requires_grad_(True)
            torch.autograd.grad(net(xb).gather(1, y[s : s + bs, None]).sum(), xb)

    def precompute(label: str, method: str, params: dict) -> float:
        store = tmp / f"method-{label}.zarr"
        shutil.copytree(base, store)
        summary: dict = {}
        c = dataclasses.replace(cfg(store, methods=(method,), method_params=params), data=sub)
        wall, _ = _timed(lambda: summary.update(run(c)))
        shutil.rmtree(store)
        return wall - summary["seconds_ingest"]

    out: dict[str, dict] = {}
    for label, (method, params, passes) in METHODS.items():
        # Untimed: the method's first call (its hooks, captum's set-up for IG) on two images,
        # as the process is warm from the GBP runs above.
        raw(), create_method(method, **params).attribute(net, x[:2], y[:2])
        raws, pres = [], []
        for _ in range(args.method_repeats):
            raws.append(_timed(raw)[0])
            pres.append(precompute(label, method, params))
        out[label] = {
            "method": method, "params": params, "passes": passes, "n": n,
            "over_passes_x_raw": min(pres) / (passes * min(raws)),
            "per_pair": [p / (passes * r) for p, r in zip(pres, raws, strict=True)],
            "precompute_s": _stats(pres), "raw_s": _stats(raws),
            "images_per_s": n / min(pres),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """The benchmark, top to bottom (long on purpose: every figure of the results file is
    measured here in one run, one after another, so that the ratios compare like with like)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/precompute.json", help="JSON result file.")
    ap.add_argument("--n", type=int, default=1024, help="Images in the store.")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=32, help="Teacher width (ResNet-10).")
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64, help="Teacher sub-batch.")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="Repeats of the in-process timings.")
    ap.add_argument("--dask-repeats", type=int, default=5,
                    help="Repeats per dask cluster size (the least disturbed run counts).")
    ap.add_argument("--per-image", type=int, default=128, help="Images timed one at a time.")
    ap.add_argument("--no-dask", action="store_true", help="Skip the dask measurements.")
    ap.add_argument("--method-n", type=int, default=128,
                    help="Images of the per-method runs (SmoothGrad, IG, Guided Grad-CAM++).")
    ap.add_argument("--method-repeats", type=int, default=2, help="Repeats per method.")
    ap.add_argument("--no-methods", action="store_true", help="Skip the per-method figures.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from pipelines.common import DataSpec, git_sha, tune_allocator
    from pipelines.precompute import (
        PrecomputeConfig,
        _overlap_io,
        auto_shard_chunks,
        local_cluster,
        run,
    )
    from trainer.checkpoint import Checkpoint, load_model, save_checkpoint
    from trainer.models import create_model
    from trainer.saliency import compute_maps, create_method

    t_start = time.perf_counter()
    load_before = _loadavg()
    torch.set_num_threads(1)  # what every precompute worker uses (threads_per_worker=1)
    allocator_tuned = tune_allocator()  # as `sat` and every dask map task do
    n, bs = args.n, args.batch_size
    data = DataSpec("synthetic", None, {"n": n, "n_val": 64, "image_size": args.image_size,
                                        "num_classes": args.num_classes, "seed": args.seed})
    tmp = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        torch.manual_seed(args.seed)
        model = create_model("resnet10", args.num_classes, width=args.width)
        teacher = tmp / "teacher.safetensors"
        save_checkpoint(teacher, Checkpoint(
            arch=model.arch, model_state=model.state_dict(), extra={"teacher_mode": "standard"}))

        def cfg(store: Path, **kw) -> PrecomputeConfig:
            base = {"store": str(store), "data": data, "splits": ("train",), "teachers": (str(teacher),),
                    "methods": ("gbp",), "chunk_size": args.chunk_size, "batch_size": bs,
                    "device": "cpu", "seed": args.seed, "show_progress": False}
            return PrecomputeConfig(**{**base, **kw})

        base = tmp / "ingested.zarr"
        ingest_s, _ = _timed(lambda: run(cfg(base, teachers=())))
        copies = iter(range(1_000_000))

        def fresh_store() -> Path:
            # A copy of the ingested store without maps (copying is not timed).
            p = tmp / f"run{next(copies)}.zarr"
            shutil.copytree(base, p)
            return p

        def precompute(**kw) -> dict:
            store = fresh_store()
            summary: dict = {}
            wall, cpu = _timed(lambda: summary.update(run(cfg(store, **kw))))
            assert summary["chunks_written"] == -(-n // args.chunk_size), summary
            shutil.rmtree(store)
            # "maps": the run without its ingest phase (opening the data and checking the
            # split's fingerprint against it), i.e. planning, the map tasks and finalising.
            return {"wall": wall, "cpu": cpu, "maps": wall - summary["seconds_ingest"]}

        # The same images, labels and batches precompute reads, already in memory as floats.
        ds = data.open("train")
        x_all = torch.from_numpy(ds.load_images(0, n)).float().div_(255.0)
        y_all = torch.from_numpy(np.asarray(ds.labels(), dtype=np.int64))
        net, _ = load_model(teacher, "cpu")  # eval mode, as precompute loads it

        def raw_fwd_bwd() -> None:
            for s in range(0, n, bs):
                x = x_all[s : s + bs].detach().requires_grad_(True)
                score = net(x).gather(1, y_all[s : s + bs, None]).sum()
                torch.autograd.grad(score, x)

        # One untimed pass of each first: the first pass of a process pays for oneDNN's
        # kernel set-up, page faults and the teacher load, and ran up to 50 % slower here.
        raw_fwd_bwd()
        precompute()
        raw, pre = [], []
        for _ in range(args.repeats):  # interleaved, so a burst of load hits both alike
            raw.append(dict(zip(("wall", "cpu"), _timed(raw_fwd_bwd), strict=True)))
            pre.append(precompute())
        raw_wall, pre_wall = [r["wall"] for r in raw], [p["wall"] for p in pre]
        pre_maps = [p["maps"] for p in pre]
        raw_cpu, pre_cpu = [r["cpu"] for r in raw], [p["cpu"] for p in pre]

        method = create_method("gbp")
        k = min(args.per_image, n)

        def per_image() -> None:
            for i in range(k):
                compute_maps(method, net, x_all[i : i + 1], y_all[i : i + 1])

        per_image_wall, _ = _timed(per_image)
        per_image_total = per_image_wall * n / k

        per_method = {} if args.no_methods else time_methods(
            args, data, tmp, cfg, run, net)

        dask_res: dict = {}
        if not args.no_dask:
            from dask.distributed import Client

            # One cluster at a time, as a user runs it; each gets an untimed warm-up run.
            for workers in (1, 2):
                with local_cluster(workers) as cluster, Client(cluster) as client:
                    client.run(_warm_worker)
                    precompute(scheduler=cluster.scheduler_address)
                    bare_args = (str(teacher), n // workers, bs, args.image_size, args.seed)
                    client.run(_bare_passes, *bare_args)  # untimed: the workers' first passes
                    runs, bare = [], []
                    for _ in range(args.dask_repeats):
                        # Each precompute run is followed by the bare passes on every worker
                        # at once (the same share of the work each), so both see the same
                        # machine: on this VM two processes scale anywhere from 1.6x to 2.0x.
                        runs.append(precompute(scheduler=cluster.scheduler_address))
                        bare.append(max(client.run(_bare_passes, *bare_args).values()))
                dask_res[f"{workers}w"] = _stats([r["wall"] for r in runs])
                dask_res[f"{workers}w_maps"] = _stats([r["maps"] for r in runs])
                dask_res[f"{workers}w_bare_passes"] = _stats(bare)

        results = {
            "precompute_over_raw_fwd_bwd": min(pre_maps) / min(raw_wall),
            "precompute_over_raw_fwd_bwd_median": statistics.median(pre_maps)
            / statistics.median(raw_wall),
            "precompute_over_raw_fwd_bwd_per_pair": [
                p / r for p, r in zip(pre_maps, raw_wall, strict=True)
            ],
            "precompute_over_raw_fwd_bwd_whole_run": min(pre_wall) / min(raw_wall),
            "precompute_over_raw_fwd_bwd_whole_run_cpu": min(pre_cpu) / min(raw_cpu),
            "dask_2w_over_1w_speedup": (dask_res["1w_maps"]["min"] / dask_res["2w_maps"]["min"])
            if dask_res else None,
            "dask_2w_over_1w_speedup_whole_run": (dask_res["1w"]["min"] / dask_res["2w"]["min"])
            if dask_res else None,
            "bare_2w_over_1w_speedup": (dask_res["1w_bare_passes"]["min"]
                                        / dask_res["2w_bare_passes"]["min"]) if dask_res else None,
            "speedup_vs_per_image_online": per_image_total / min(pre_maps),
            "precompute_images_per_s": n / min(pre_maps),
            "raw_fwd_bwd_images_per_s": n / min(raw_wall),
            "per_image_online_images_per_s": k / per_image_wall,
        }
        results["dask_scaling_efficiency"] = (
            results["dask_2w_over_1w_speedup"] / results["bare_2w_over_1w_speedup"]
            if dask_res else None)
        for label, fig in per_method.items():
            results[f"{label}_over_passes_x_raw"] = fig["over_passes_x_raw"]
        n_chunks = -(-n // args.chunk_size)
        out_doc = {
            **results,
            "methods": per_method,
            "targets": {
                key: {"target": f"{op} {v}", "met": None if results[key] is None else
                      (results[key] <= v if op == "<=" else results[key] >= v)}
                for key, (op, v) in {**TARGETS, **METHOD_TARGETS}.items() if key in results
            },
            "timings_s": {
                "ingest_once": ingest_s,
                "raw_fwd_bwd_wall": _stats(raw_wall),
                "raw_fwd_bwd_cpu": _stats(raw_cpu),
                "precompute_in_process_wall": _stats(pre_wall),
                "precompute_in_process_maps_phase_wall": _stats(pre_maps),
                "precompute_in_process_cpu": _stats(pre_cpu),
                "per_image_online_subset_wall": per_image_wall,
                "per_image_online_scaled_to_n": per_image_total,
                **{f"precompute_dask_{w}": v for w, v in dask_res.items()},
                "benchmark_total": time.perf_counter() - t_start,
            },
            "params": {
                "n": n, "image_size": args.image_size, "num_classes": args.num_classes,
                "teacher": f"resnet10 width {args.width} (untrained)", "method": "gbp",
                "target_rule": "label", "batch_size": bs, "chunk_size": args.chunk_size,
                "n_chunks": n_chunks, "shard_chunks": auto_shard_chunks(n_chunks),
                "torch_threads_per_process": 1, "allocator_tuned": allocator_tuned,
                "in_process_overlap_io": _overlap_io(cfg(base)), "repeats": args.repeats,
                "dask_repeats": args.dask_repeats, "per_image_subset": k, "seed": args.seed,
                "images_in_store": True,
            },
            "conditions": {
                "loadavg_before": load_before, "loadavg_after": _loadavg(),
                "note": "wall-clock minimum over repeats is the headline; a busy machine "
                        "inflates times and lowers the dask speed-up",
            },
            "versions": _versions(),
            "git_sha": git_sha(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out_doc, indent=2) + "\n")
    t = out_doc["timings_s"]
    print(f"precompute of {n} images ({args.image_size}x{args.image_size}), GBP of ResNet-10 width "
          f"{args.width}, batch {bs}, chunks of {args.chunk_size}:")
    print(f"  raw forward+backward {t['raw_fwd_bwd_wall']['min']:.2f}s   precompute in-process "
          f"{t['precompute_in_process_maps_phase_wall']['min']:.2f}s (whole run "
          f"{t['precompute_in_process_wall']['min']:.2f}s with its ingest check; first ingest "
          f"{t['ingest_once']:.2f}s, not counted)")
    for key, (op, v) in TARGETS.items():
        val = results[key]
        shown = "skipped" if val is None else f"{val:.3f}"
        met = out_doc["targets"][key]["met"]
        print(f"  {key:<30} {shown:>8}   target {op} {v}  "
              f"{'' if met is None else ('met' if met else 'MISSED')}")
    print(f"  {'  whole run / raw (wall, CPU)':<30} "
          f"{results['precompute_over_raw_fwd_bwd_whole_run']:>8.3f} "
          f"{results['precompute_over_raw_fwd_bwd_whole_run_cpu']:.3f}")
    if dask_res:
        print(f"  dask 1 worker {dask_res['1w_maps']['min']:.2f}s   2 workers "
              f"{dask_res['2w_maps']['min']:.2f}s: speed-up {results['dask_2w_over_1w_speedup']:.3f} "
              f"(whole runs {dask_res['1w']['min']:.2f}s, {dask_res['2w']['min']:.2f}s: "
              f"{results['dask_2w_over_1w_speedup_whole_run']:.3f}); bare passes on the same "
              f"workers {results['bare_2w_over_1w_speedup']:.3f}")
    for label, fig in per_method.items():
        key = f"{label}_over_passes_x_raw"
        tgt = out_doc["targets"].get(key)
        shown = "" if tgt is None else f"   target {tgt['target']}  {'met' if tgt['met'] else 'MISSED'}"
        print(f"  {key:<30} {fig['over_passes_x_raw']:>8.3f}{shown}   ({fig['passes']} passes, "
              f"{fig['n']} images: precompute {fig['precompute_s']['min']:.2f}s, raw x passes "
              f"{fig['passes'] * fig['raw_s']['min']:.2f}s)")
    print(f"  {'speedup_vs_per_image_online':<30} {results['speedup_vs_per_image_online']:>8.1f}x   "
          f"({k} images one at a time, scaled to {n})")
    print(f"  load average before {load_before} after {out_doc['conditions']['loadavg_after']}; "
          f"total {t['benchmark_total']:.0f}s; saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
