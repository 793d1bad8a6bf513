"""Spatial augmentation moves each map with its image (the authors' code flipped only images)."""

import torch

from trainer.augment import random_crop_flip


def _image_and_map(b=16, c=3, h=12, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    # A map that is a pure function of the pixel: sign of (channel-mean - 127.5); never 0.
    maps = torch.where(images.float().mean(1, keepdim=True) > 127.5, 1, -1).to(torch.int8)
    return images, maps


def test_flip_and_crop_keep_map_aligned_with_image():
    images, maps = _image_and_map()
    out_img, (out_map,) = random_crop_flip(
        images, [maps], padding=3, flip=True, generator=torch.Generator().manual_seed(1)
    )
    assert out_img.shape == images.shape and out_img.dtype == images.dtype
    assert out_map.shape == maps.shape and out_map.dtype == maps.dtype
    # Inside the image the map is still the function of the pixels; in the zero padding the
    # image is 0 and the map is 0 ("no saliency").
    recomputed = torch.where(out_img.float().mean(1, keepdim=True) > 127.5, 1, -1).to(torch.int8)
    padded = (out_map == 0)
    assert padded.any(), "padding=3 over 16 samples should crop into the border somewhere"
    assert torch.equal(out_map[~padded], recomputed[~padded])
    assert (out_img.permute(1, 0, 2, 3)[:, padded.squeeze(1)] == 0).all()


def test_flip_only_is_exact_mirror_per_sample():
    images, maps = _image_and_map(b=32)
    out_img, (out_map,) = random_crop_flip(
        images, [maps], padding=0, flip=True, generator=torch.Generator().manual_seed(2)
    )
    flipped = 0
    for i in range(images.shape[0]):
        if torch.equal(out_img[i], images[i].flip(-1)) and not torch.equal(images[i], images[i].flip(-1)):
            flipped += 1
            assert torch.equal(out_map[i], maps[i].flip(-1))
        else:
            assert torch.equal(out_img[i], images[i])
            assert torch.equal(out_map[i], maps[i])
    assert 0 < flipped < images.shape[0]


def test_crop_matches_reference_crop_of_padded_image():
    images, maps = _image_and_map(b=4, c=3, h=8, w=8)
    maps3 = maps.expand(-1, 3, -1, -1).clone()  # a C-channel map as well as a 1-channel one
    gen = torch.Generator().manual_seed(5)
    out_img, (m1, m3) = random_crop_flip(images, [maps, maps3], padding=2, flip=False, generator=gen)
    # Recover each offset by searching the padded image; the maps must sit at the same offset.
    pimg = torch.nn.functional.pad(images, (2, 2, 2, 2))
    pmap = torch.nn.functional.pad(maps, (2, 2, 2, 2))
    for i in range(4):
        hits = [(oy, ox) for oy in range(5) for ox in range(5)
                if torch.equal(pimg[i, :, oy:oy + 8, ox:ox + 8], out_img[i])]
        assert hits
        assert any(torch.equal(pmap[i, :, oy:oy + 8, ox:ox + 8], m1[i]) for oy, ox in hits)
        assert torch.equal(m3[i], m1[i].expand(3, -1, -1))


def test_same_generator_seed_same_augmentation():
    images, maps = _image_and_map()
    a = random_crop_flip(images, [maps], padding=4, flip=True, generator=torch.Generator().manual_seed(9))
    b = random_crop_flip(images, [maps], padding=4, flip=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


def test_crop_and_flip_together_on_non_square_images():
    images, maps = _image_and_map(b=24, c=3, h=6, w=10, seed=3)
    p = 2
    out_img, (out_map,) = random_crop_flip(
        images, [maps], padding=p, flip=True, generator=torch.Generator().manual_seed(4)
    )
    pimg = torch.nn.functional.pad(images, (p, p, p, p))
    pmap = torch.nn.functional.pad(maps, (p, p, p, p))
    flips = 0
    for i in range(images.shape[0]):
        # Every (offset, flip) that reproduces the image must also reproduce the map.
        hits = [(oy, ox, f) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for f in (0, 1)
                if torch.equal(_view(pimg[i], oy, ox, 6, 10, f), out_img[i])]
        assert hits, i
        assert all(torch.equal(_view(pmap[i], oy, ox, 6, 10, f), out_map[i]) for oy, ox, f in hits)
        flips += all(f for _, _, f in hits)
    assert 0 < flips < images.shape[0]


def _view(padded, oy, ox, h, w, flipped):
    crop = padded[:, oy:oy + h, ox:ox + w]
    return crop.flip(-1) if flipped else crop
