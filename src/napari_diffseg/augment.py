"""Training-time augmentation of a batch of slices.

Images are (N, C, H, W) with each modality scaled to [0, 1] and the background exactly 0
(``data.normalise_intensity``); masks are (N, 1, H, W) in {0, 1}. Every random draw comes
from the numpy generator the trainer draws its batches with, so a seeded run (and a resumed
one) sees the same batches.

Nine training cases from a handful of sites leave a model with a narrow idea of how bright a
tumour is and how a head lies in the field of view; held-out sites differ in both. So beside
the left-right flip there are two optional families:

- intensity: each modality of each slice gets its own gamma and gain, which change contrast
  and brightness the way scanners and protocols do; zero stays zero, so the background and
  the brain outline are untouched;
- spatial: a small rotation and zoom about the slice centre, applied to images and mask alike
  (the mask resampled bilinearly and cut at 0.5, so it stays binary).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

GAMMA_RANGE = (0.7, 1.4)  # drawn log-uniformly, so brighter and darker are equally likely
GAIN_RANGE = (0.9, 1.1)
MAX_ROTATION_DEGREES = 15.0
ZOOM_RANGE = (0.9, 1.1)


def flip_left_right(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator):
    """Half the slices mirrored across the brain's midline (the array's first spatial axis:
    BraTS volumes are stored x, y, z)."""
    flip = torch.from_numpy(rng.random(images.shape[0]) < 0.5)
    images, masks = images.clone(), masks.clone()
    images[flip] = images[flip].flip(-2)
    masks[flip] = masks[flip].flip(-2)
    return images, masks


def jitter_intensity(images: torch.Tensor, rng: np.random.Generator,
                     gamma_range=GAMMA_RANGE, gain_range=GAIN_RANGE, modalities: int = 4) -> torch.Tensor:
    """x -> gain * x ** gamma per slice and modality, clipped back to [0, 1]. With neighbouring
    slices as extra channels (``modalities`` channels per slice offset) a modality's draw holds
    for all its offsets: a scanner changes a whole volume's contrast, not one slice's."""
    n, c = images.shape[:2]
    groups = modalities if c % modalities == 0 else c
    log_low, log_high = math.log(gamma_range[0]), math.log(gamma_range[1])
    gamma = torch.from_numpy(np.exp(rng.uniform(log_low, log_high, (n, groups)))).to(images).repeat(1, c // groups)
    gain = torch.from_numpy(rng.uniform(*gain_range, (n, groups))).to(images).repeat(1, c // groups)
    shape = (n, c) + (1,) * (images.ndim - 2)
    # clamp before the power: a negative value would give nan, and 0 ** gamma stays 0
    jittered = images.clamp(0, 1).pow(gamma.view(shape)) * gain.view(shape)
    return jittered.clamp(0, 1)


def rotate_and_zoom(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
                    max_degrees: float = MAX_ROTATION_DEGREES, zoom_range=ZOOM_RANGE):
    """A random rotation (uniform in +-max_degrees) and zoom per slice, about its centre.
    Pixels that come from outside the slice are background (0)."""
    n = images.shape[0]
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees, n))
    zoom = rng.uniform(*zoom_range, n)
    # affine_grid maps output coordinates to input ones: dividing by the zoom enlarges the content
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    # the grid's coordinates run -1..1 along each axis, so on a non-square slice the rotation's
    # cross terms carry the aspect ratio (x is the last axis, of width w)
    h, w = images.shape[-2:]
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin * h / w, sin * w / h, cos
    theta = torch.from_numpy(theta).to(torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_masks = F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.to(images.dtype), (warped_masks >= 0.5).to(masks.dtype)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
                  flip: bool = False, intensity: bool = False, spatial: bool = False):
    """The batch with the chosen augmentations applied, in a fixed order (flip, warp,
    intensity), each drawing from ``rng`` only when it is on."""
    if flip:
        images, masks = flip_left_right(images, masks, rng)
    if spatial:
        images, masks = rotate_and_zoom(images, masks, rng)
    if intensity:
        images = jitter_intensity(images, rng)
    return images, masks
