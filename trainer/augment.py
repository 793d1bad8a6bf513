"""Batched spatial augmentation applied to images and their saliency maps *together*.

Maps are stored for the un-augmented image. Any crop or flip of the image must move the map
with it; the authors' code flipped images but not their box maps. Everything here runs on
whatever device the tensors are on, with an explicit generator.
"""

from __future__ import annotations

import torch


def random_crop_flip(
    images: torch.Tensor,
    maps: list[torch.Tensor],
    *,
    padding: int,
    flip: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random crop (zero padding of ``padding`` pixels) and horizontal flip, per sample.

    images: (B, C, H, W), any dtype. maps: list of (B, C' , H, W) tensors (C' = C or 1),
    any dtype; padded regions of a map are 0 ("no saliency"). The same offsets and flips are
    used for the image and each of its maps. Returns tensors of the input shapes and dtypes.
    """
    b, _, h, w = images.shape
    dev = images.device
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        bidx = torch.arange(b, device=dev)[:, None, None, None]

        def crop(t: torch.Tensor) -> torch.Tensor:
            tp = torch.nn.functional.pad(t, (padding, padding, padding, padding))
            cidx = torch.arange(t.shape[1], device=dev)[None, :, None, None]
            return tp[bidx, cidx, rows, cols]

        images = crop(images)
        maps = [crop(m) for m in maps]
    if flip:
        do = torch.rand(b, generator=generator, device=dev) < 0.5
        sel = do[:, None, None, None]
        images = torch.where(sel, images.flip(-1), images)
        maps = [torch.where(sel, m.flip(-1), m) for m in maps]
    return images, maps
