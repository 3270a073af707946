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

A third, ``strong`` (for sites unlike the training ones), adds the kind nnU-Net trains with,
each applied to a slice with its own modest probability: an elastic deformation (images and mask
alike), then, after the gamma and gain, Gaussian noise, Gaussian blur, a brightness factor, a
contrast change about the brain's mean and a simulated low resolution. The intensity ones act
inside the brain only (the pixels where any modality of the slice offset is non-zero): BraTS
volumes are skull-stripped after resampling, so however blurred or noisy a scan, its background
is exactly 0, and the model should see that.

With neighbouring slices as extra channels (groups of 4 modalities, one per slice offset) every
draw for a modality holds for all its offsets: the same scanner made the neighbouring slices, so
they share one intensity map. The noise field is shared too, so that offsets which are copies of
one slice (at a volume's edge, or a lone 2D slice) stay copies.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

GAMMA_RANGE = (0.7, 1.4)  # drawn log-uniformly, so brighter and darker are equally likely
GAIN_RANGE = (0.9, 1.1)
MAX_ROTATION_DEGREES = 15.0
ZOOM_RANGE = (0.9, 1.1)

# --augment_strong: per-slice probabilities and strengths near nnU-Net's defaults
ELASTIC_PROBABILITY = 0.2
ELASTIC_GRID = 5  # control points per side: one bend every ~32 px at 128, a smooth field
ELASTIC_MAGNITUDE = 0.03  # largest control-point shift, a fraction of the side (~4 px at 128)
NOISE_PROBABILITY, NOISE_VARIANCE = 0.1, (0.0, 0.01)  # variance in [0, 1] intensity units
BLUR_PROBABILITY, BLUR_SIGMA = 0.2, (0.5, 1.0)  # pixels
BRIGHTNESS_PROBABILITY, BRIGHTNESS_RANGE = 0.15, (0.75, 1.25)
CONTRAST_PROBABILITY, CONTRAST_RANGE = 0.15, (0.75, 1.25)
LOW_RES_PROBABILITY, LOW_RES_FACTOR = 0.25, (1.0, 2.0)  # downsampling factor per side


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


def _layout(channels: int, modalities: int):
    """(offsets, modalities per offset) of a batch's channels; channels that are not whole
    groups of ``modalities`` are each their own modality, as in ``jitter_intensity``."""
    groups = modalities if channels % modalities == 0 else channels
    return channels // groups, groups


def brain_mask(images: torch.Tensor, modalities: int = 4) -> torch.Tensor:
    """(N, C, H, W) bool: the pixels where any modality of the channel's slice offset is
    non-zero (the skull-stripped brain; ``preprocess.normalise`` reads it the same way)."""
    n, c = images.shape[:2]
    offsets, groups = _layout(c, modalities)
    grouped = images.reshape(n, offsets, groups, *images.shape[2:])
    # the largest magnitude rather than any(x != 0): the same pixels, twice as fast on CPU
    return (grouped.abs().amax(2, keepdim=True) != 0).expand_as(grouped).reshape(images.shape)


def _chosen(rng: np.random.Generator, n: int, probability: float) -> np.ndarray:
    # one draw per slice whatever the outcome, so the stream's use depends on n only here
    return np.flatnonzero(rng.random(n) < probability)


def _per_channel(values: np.ndarray, offsets: int, like: torch.Tensor) -> torch.Tensor:
    """(m, modalities) draws -> (m, C, 1, 1), each modality's value at all its offsets."""
    return torch.from_numpy(values).to(like).repeat(1, offsets)[..., None, None]


@functools.lru_cache(maxsize=8)
def _cubic_upsampler(points: int, size: int) -> torch.Tensor:
    """(size, points): row i holds the bicubic weights of the control points at pixel i, the
    end points on the first and last pixels (each unit vector upsampled on its own)."""
    unit = torch.eye(points).view(1, points, points, 1)
    return F.interpolate(unit, size=(size, 1), mode="bicubic", align_corners=True)[0, :, :, 0].T.contiguous()


@functools.lru_cache(maxsize=8)
def _identity_grid(h: int, w: int) -> torch.Tensor:
    """(1, h, w, 2): grid_sample's coordinates of each pixel itself (built once per size:
    affine_grid costs more than the warp of a few slices)."""
    return F.affine_grid(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), [1, 1, h, w], align_corners=False)


def elastic_deform(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
                   probability: float = ELASTIC_PROBABILITY, grid: int = ELASTIC_GRID,
                   magnitude: float = ELASTIC_MAGNITUDE):
    """A smooth random warp of some slices: shifts drawn at a coarse grid of control points
    (uniform in +-magnitude of the side) and upsampled bicubically to a displacement per pixel.
    Images bilinear, the mask bilinear and cut at 0.5, all channels with the same field."""
    n, _, h, w = images.shape
    idx = _chosen(rng, n, probability)
    if idx.size == 0:
        return images, masks
    m = idx.size
    # the sampling grid runs -1..1 across a side, so a shift of magnitude * side is 2 * magnitude
    coarse = torch.from_numpy(rng.uniform(-2 * magnitude, 2 * magnitude, (m, 2, grid, grid))).float()
    # bicubic upsampling is separable: two small matrix products, far cheaper than interpolating
    flow = _cubic_upsampler(grid, h) @ coarse @ _cubic_upsampler(grid, w).T
    field = _identity_grid(h, w) + flow.permute(0, 2, 3, 1)
    sel = torch.from_numpy(idx)
    images, masks = images.clone(), masks.clone()
    warped = F.grid_sample(images.index_select(0, sel).float(), field, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    warped_masks = F.grid_sample(masks.index_select(0, sel).float(), field, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
    images[sel] = warped.to(images.dtype)
    masks[sel] = (warped_masks >= 0.5).to(masks.dtype)
    return images, masks


# The strong intensity transforms below act on every slice they are given (strong_intensity
# picks which), with ``brain`` from ``brain_mask`` and a strength per slice and modality.

def add_noise(images: torch.Tensor, brain: torch.Tensor, rng: np.random.Generator,
              variance_range=NOISE_VARIANCE, modalities: int = 4) -> torch.Tensor:
    """Gaussian noise inside the brain, a variance per slice and modality."""
    n, c, h, w = images.shape
    offsets, groups = _layout(c, modalities)
    sigma = _per_channel(np.sqrt(rng.uniform(*variance_range, (n, groups))), 1, images)
    # the field from a torch generator seeded by ``rng`` (so still repeated by a seeded run):
    # torch draws normals several times faster than numpy
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    field = torch.randn((n, groups, h, w), generator=generator).to(images) * sigma
    noise = field.repeat(1, offsets, 1, 1)
    return torch.where(brain, images + noise, images)


def blur(images: torch.Tensor, brain: torch.Tensor, rng: np.random.Generator,
         sigma_range=BLUR_SIGMA, modalities: int = 4) -> torch.Tensor:
    """A Gaussian blur, a width per slice and modality; the background put back to 0."""
    n, c, h, w = images.shape
    offsets, groups = _layout(c, modalities)
    sigma = _per_channel(rng.uniform(*sigma_range, (n, groups)), offsets, images).reshape(n * c, 1)
    radius = max(1, math.ceil(3 * sigma_range[1]))
    taps = torch.arange(-radius, radius + 1).to(images)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N * C, 2 * radius + 1)
    # one separable depthwise convolution for every slice and channel at once
    x = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    return torch.where(brain, x, torch.zeros_like(x))


def scale_brightness(images: torch.Tensor, brain: torch.Tensor, rng: np.random.Generator,
                     factor_range=BRIGHTNESS_RANGE, modalities: int = 4) -> torch.Tensor:
    """Each slice and modality multiplied by a factor (zero stays zero, so ``brain`` is not
    needed; it is taken for the same call as the others)."""
    offsets, groups = _layout(images.shape[1], modalities)
    return images * _per_channel(rng.uniform(*factor_range, (images.shape[0], groups)), offsets, images)


def change_contrast(images: torch.Tensor, brain: torch.Tensor, rng: np.random.Generator,
                    factor_range=CONTRAST_RANGE, modalities: int = 4) -> torch.Tensor:
    """Inside the brain, x -> mean + factor * (x - mean), a factor per slice and modality about
    the mean of that modality's brain over all its offsets (one map for all of them)."""
    n, c, h, w = images.shape
    offsets, groups = _layout(c, modalities)
    factor = _per_channel(rng.uniform(*factor_range, (n, groups)), offsets, images)
    grouped, inside = images.reshape(n, offsets, groups, h, w), brain.reshape(n, offsets, groups, h, w)
    mean = (grouped * inside).sum((1, 3, 4)) / inside.sum((1, 3, 4)).clamp_min(1)
    mean = mean.repeat(1, offsets)[..., None, None]
    return torch.where(brain, mean + factor * (images - mean), images)


def simulate_low_resolution(images: torch.Tensor, brain: torch.Tensor, rng: np.random.Generator,
                            factor_range=LOW_RES_FACTOR, modalities: int = 4) -> torch.Tensor:
    """Each slice and modality sampled down by its own factor (nearest) and back up
    (bilinear), as a coarser acquisition looks; the background put back to 0."""
    n, c, h, w = images.shape
    _, groups = _layout(c, modalities)
    factor = rng.uniform(*factor_range, (n, groups))
    out = torch.empty_like(images)
    for i in range(n):
        for g in range(groups):
            # the modality at all its offsets: channels g, g + groups, ...
            small = (max(1, round(h / factor[i, g])), max(1, round(w / factor[i, g])))
            coarse = F.interpolate(images[i, g::groups][None], size=small, mode="nearest")
            out[i, g::groups] = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return torch.where(brain, out, torch.zeros_like(out))


STRONG_INTENSITY = ((add_noise, NOISE_PROBABILITY), (blur, BLUR_PROBABILITY),
                    (scale_brightness, BRIGHTNESS_PROBABILITY), (change_contrast, CONTRAST_PROBABILITY),
                    (simulate_low_resolution, LOW_RES_PROBABILITY))  # nnU-Net's order


def strong_intensity(images: torch.Tensor, rng: np.random.Generator, modalities: int = 4,
                     steps=STRONG_INTENSITY) -> torch.Tensor:
    """Each transform of ``steps`` on its own random share of the slices (its probability),
    inside the brain as it was before them; the batch clipped back to [0, 1]."""
    n = images.shape[0]
    chosen = np.stack([rng.random(n) < probability for _, probability in steps])
    out = images.clamp(0, 1)  # a copy; the slices no transform picked are done
    touched = np.flatnonzero(chosen.any(0))
    if touched.size == 0:
        return out
    # only the picked slices are worked on: a small share of the batch at these probabilities
    # (index_select: several times faster than indexing with a tensor on CPU)
    picked = images.index_select(0, torch.from_numpy(touched))
    brain = brain_mask(picked, modalities)
    for (step, _), on in zip(steps, chosen[:, touched]):
        if on.any():
            rows = torch.from_numpy(np.flatnonzero(on))
            picked[rows] = step(picked.index_select(0, rows), brain.index_select(0, rows), rng, modalities=modalities)
    out[torch.from_numpy(touched)] = picked.clamp(0, 1)
    return out


def augment_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
                  flip: bool = False, intensity: bool = False, spatial: bool = False, strong: bool = False):
    """The batch with the chosen augmentations applied, in a fixed order (flip, rotation and
    zoom, elastic, gamma and gain, the strong intensity ones), each drawing from ``rng`` only
    when it is on."""
    if flip:
        images, masks = flip_left_right(images, masks, rng)
    if spatial:
        images, masks = rotate_and_zoom(images, masks, rng)
    if strong:
        images, masks = elastic_deform(images, masks, rng)
    if intensity:
        images = jitter_intensity(images, rng)
    if strong:
        images = strong_intensity(images, rng)
    return images, masks
