"""Pictures of a store's maps: the ``sat cache show`` grid (image, map, overlay per sample).

Library code (the CLI, ``pipelines.compare``) draws through :func:`render_show`; matplotlib
is imported only when a picture is drawn, and through its Agg canvas (no pyplot state).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from saliency_cache.errors import SatError
from saliency_cache.store import SaliencyStore, resolve_map


def render_show(
    st: SaliencyStore, split_name: str | None, map_name: str, indices, out: str | Path
) -> dict[str, Any]:
    """Write the ``sat cache show`` PNG grid for ``indices`` of a map; return what was drawn.

    Args:
        st: an open store. split_name: the split (None: see :func:`resolve_map`).
        map_name: ``MAP`` or ``SPLIT/MAP``. indices: sample indices, one row each.
        out: the PNG to write (its directory must exist).

    Returns:
        ``{"out", "split", "map", "indices"}``.
    """
    sp, name = resolve_map(st, split_name, map_name)
    r = sp.inspect_map(name)
    r.check_files()  # a lost shard or done flags file would draw as fill values
    for i in indices:
        if not 0 <= i < sp.n:
            raise SatError(f"--index {i} is outside split {sp.name!r} of {sp.n} samples")
    done = r.done_chunks()
    for i in indices:
        if not done[i // r.chunk_size]:
            raise SatError(
                f"sample {i} is in chunk {i // r.chunk_size} of map {name!r}, which was never written"
            )
    path = Path(out)
    if not path.parent.is_dir():
        raise SatError(f"cannot write --out {out}: directory {path.parent} does not exist")
    maps = r.read_indices(list(indices))
    images = sp.read_images_indices(list(indices)) if sp.has_images() else None
    labels = sp.labels()
    ids = sp.ids()
    titles = []
    for i in indices:
        lab = int(labels[i])
        cname = sp.class_names[lab] if sp.class_names and lab < len(sp.class_names) else None
        titles.append(f"{ids[i]} · label {lab}" + (f" ({cname})" if cname else ""))
    _draw(path, maps, images, titles, name)
    return {"out": str(path), "split": sp.name, "map": name, "indices": list(indices)}


def _draw(
    path: Path, maps: np.ndarray, images: np.ndarray | None, titles: list[str], name: str
) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(titles), (3 if images is not None else 1)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    mean = maps.astype(np.float32).mean(axis=1)  # (B, H, W) in [-1, 1]
    for i, title in enumerate(titles):
        # Sample ids are paths (Tiny ImageNet's run to 40+ characters): wrap them to the
        # panel's width instead of letting the figure clip them.
        title = "\n".join(textwrap.wrap(title, 34 if images is not None else 30))
        panels = []
        if images is not None:
            img = images[i]
            rgb = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
            cmap = None if img.shape[0] == 3 else "gray"
            axes[i, 0].imshow(rgb, cmap=cmap, vmin=0, vmax=255)
            axes[i, 0].set_title(f"{title}\nimage", fontsize=7)
            axes[i, 2].imshow(rgb, cmap=cmap, vmin=0, vmax=255)
            axes[i, 2].imshow(mean[i], cmap="bwr", vmin=-1, vmax=1, alpha=0.45)
            axes[i, 2].set_title("overlay", fontsize=7)
            panels = [axes[i, 0], axes[i, 2]]
        ax = axes[i, 1 if images is not None else 0]
        im = ax.imshow(mean[i], cmap="bwr", vmin=-1, vmax=1)
        ax.set_title(f"{title}\n{name}" if images is None else name, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, ticks=[-1, 0, 1])
        for a in [*panels, ax]:
            a.set_xticks([])
            a.set_yticks([])
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as e:
        raise SatError(f"cannot write --out {path}: {e}") from None
