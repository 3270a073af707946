"""How to sample, and how the user's input steers the chains: two option objects that travel
whole from the command line and the widget to :meth:`inference.Segmenter.run` and on to
:func:`ensemble.sample_ensemble`, each checked once, here.

:class:`SamplingOptions` leaves a setting at None for the model's stored default (ensemble
size, steps, sampler) or the loaded model's own (precision, batching); :meth:`SamplingOptions.resolved`
fills them in. :class:`Guidance` holds arrays on the input's grid for ``Segmenter.run``, and
tensors on the network's grid, one batch of slices, for ``sample_ensemble``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import DiffSegError

SAMPLERS = ("ddpm", "ddim")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BATCHING_ENV = "NAPARI_DIFFSEG_BATCHING"  # the default batching where none is given (else auto)


def parse_batching(value: str | int | None) -> str | int:
    """"auto" (a timed probe picks it) or a positive number of chains per network call; None
    takes $NAPARI_DIFFSEG_BATCHING, else auto."""
    where = "batching"
    if value is None:
        value = os.environ.get(BATCHING_ENV) or "auto"
        where = f"${BATCHING_ENV}"
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise DiffSegError(f"{where} {value!r}: give auto or a number of chains per network call (at least 1)",
                           setting="batching" if where == "batching" else None)
    return number


@dataclass(frozen=True)
class SamplingOptions:
    """The chains, their steps and the arithmetic of one run."""

    num_ensemble: int | None = None  # chains per slice; None: the model's stored size
    respacing: str | None = None  # steps: "" all, "50", "10,20", "ddim25"; None: the model's stored spec
    sampler: str | None = None  # "ddpm" or "ddim"; None or "": the model's stored sampler
    eta: float = 0.0  # DDIM's noise (0: deterministic)
    precision: str | None = None  # auto, fp32, bf16 or fp16; None: the loaded model's
    batching: str | int | None = None  # chains per network call, "auto" or a number; None: the loaded model's
    batch_slices: int | None = None  # slices per batch, fixed; None: as many as the chains per call hold
    seed: int | None = 0  # of the chains' noise; None: a fresh random seed
    # Test-time flips: every second chain of a slice runs on the left-right mirrored slice (the
    # one-pass U-Net averages both passes); None: the model's stored choice (off if it stores none)
    flip_members: bool | None = None

    def __post_init__(self):
        if self.num_ensemble is not None and int(self.num_ensemble) < 1:
            raise DiffSegError(f"the ensemble size must be at least 1 (got {self.num_ensemble})",
                               setting="num_ensemble")
        if self.sampler == "":
            object.__setattr__(self, "sampler", None)  # the widget's "model default"
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise DiffSegError(f"sampler {self.sampler!r} is unknown: use 'ddpm' or 'ddim'", setting="sampler")
        if not self.eta >= 0:
            raise DiffSegError(f"eta {self.eta}: DDIM's noise is 0 (deterministic) or more", setting="eta")
        if self.precision is not None and self.precision.lower() not in PRECISIONS:
            raise DiffSegError(f"precision {self.precision!r} is unknown: use {', '.join(PRECISIONS)}",
                               setting="precision")
        if self.batching is not None:
            parse_batching(self.batching)
        if self.batch_slices is not None and int(self.batch_slices) < 1:
            raise DiffSegError(f"slices per batch must be at least 1 (got {self.batch_slices})")

    def resolved(self, stored: dict, precision: str, batching: str | int, deterministic: bool) -> "SamplingOptions":
        """Every None filled in: the model's ``stored`` sampling defaults, the loaded model's
        (already checked) ``precision`` and ``batching``, a fresh seed. A deterministic model
        (the one-pass U-Net) runs one member: more would be copies."""
        num_ensemble = 1 if deterministic else int(stored["num_ensemble"] if self.num_ensemble is None
                                                   else self.num_ensemble)
        seed = int(np.random.SeedSequence().entropy % (2**31)) if self.seed is None else int(self.seed)
        return replace(self, num_ensemble=num_ensemble,
                       respacing=stored["timestep_respacing"] if self.respacing is None else self.respacing,
                       sampler=self.sampler or stored["sampler"], precision=precision,
                       batching=parse_batching(batching if self.batching is None else self.batching), seed=seed,
                       flip_members=bool(stored.get("flip_members", False) if self.flip_members is None
                                         else self.flip_members))


@dataclass(frozen=True)
class Guidance:
    """What the user holds fixed or marked, and where a refine starts.

    known_mask, known_values: pixels whose mask value the user gave (scribbles, an accepted
    segmentation); every member ends with exactly these values there, and the model fills in
    the rest consistently with them (RePaint).
    marks: the user's marks (1 tumour, 2 not tumour, else none): a model trained with mark
    channels sees them at every step; others ignore them. On the network's grid, the mark
    channels (S, hint_channels, h, w).
    init, start_step: refine instead of restart: earlier members, noised to the (respaced) step
    ``start_step``, then denoised from there (start_step + 1 steps instead of the whole chain).
    resample: with known pixels, each step is done this many times (RePaint's resampling).

    On the input's grid the arrays have the image's spatial shape (init: (N, *spatial)); on the
    network's grid they are tensors of one batch of S slices: (S, 1, h, w), init (S * N, 1, h, w).
    A region model (K mask channels: WT, TC, ET) holds each region known or not on its own: the
    known pixels carry a region axis first, (K, *spatial), and init (N, K, *spatial); on the
    network's grid (S, K, h, w) and (S * N, K, h, w). Its label map is nested after sampling
    (:mod:`regions`), so a known inner region outside a known-empty outer one is dropped there.
    """

    known_mask: Any = None
    known_values: Any = None
    marks: Any = None
    init: Any = None
    start_step: int | None = None
    resample: int = 1

    def __post_init__(self):
        if (self.known_mask is None) != (self.known_values is None):
            raise DiffSegError("known pixels need both a mask and their values")
        if int(self.resample) < 1:
            raise DiffSegError(f"resample must be at least 1 (got {self.resample})", setting="resample")
        if self.init is not None and self.start_step is None:
            raise DiffSegError("the members to refine need the step they start from (start_step)")

    @property
    def known(self) -> bool:
        return self.known_mask is not None

    @property
    def starts_late(self) -> bool:
        """Whether the chain starts from given members or at a given step, not from pure noise."""
        return self.init is not None or self.start_step is not None

    def check_chain(self, diffusion) -> int:
        """The step the chain starts at (a DiffSegError outside the chain); a start before the
        chain's last step needs members to start from."""
        first = diffusion.start_index(self.start_step)
        if self.init is None and first != diffusion.num_timesteps - 1:
            raise DiffSegError(f"a chain that starts at step {first}, before its last, needs the members to "
                               "refine (init)")
        return first

    def for_volume(self, spatial: tuple[int, ...], num_ensemble: int, deterministic: bool,
                   reads_marks: bool, regions: int = 1) -> "Guidance":
        """Checked against an input of ``spatial`` shape, as (H, W, Z) arrays (init (N, H, W, Z)):
        a 2D input is one slice. Marks are dropped for a model that does not read them.
        ``regions``: the model's mask channels; more than one puts the region axis first in the
        known pixels ((K, H, W, Z)) and after the member axis in init ((N, K, H, W, Z))."""
        depth = (1,) if len(spatial) == 2 else ()
        volume = (*spatial, *depth)
        # A whole-tumour model's arrays have no region axis (as before regions existed).
        per_region = (int(regions),) if regions > 1 else ()
        known_mask = known_values = init = marks = None
        if self.known:
            if deterministic:
                raise DiffSegError("refinement with known pixels needs a diffusion model; this one is a one-pass U-Net")
            shapes = np.shape(self.known_mask), np.shape(self.known_values)
            if per_region and spatial in shapes:
                # One mask for three regions: which would it hold? The caller must say per region.
                raise DiffSegError(f"this model segments {regions} regions (WT, TC, ET): its known pixels need the "
                                   f"region axis first, shape {(*per_region, *spatial)}, each region known or not "
                                   f"on its own (refine.region_known_pixels turns tumour / not-tumour marks into "
                                   f"them); got {shapes[0]} and {shapes[1]}")
            if shapes[0] != (*per_region, *spatial) or shapes[1] != (*per_region, *spatial):
                what = f"the region axis and the image's shape {(*per_region, *spatial)}" if per_region else \
                    f"the image's shape {spatial}"
                raise DiffSegError(f"the known pixels must have {what}; got {shapes[0]} and {shapes[1]}")
            known_mask = np.asarray(self.known_mask, bool).reshape(*per_region, *volume)
            known_values = np.asarray(self.known_values, np.float32).reshape(*per_region, *volume)
        if self.init is not None:
            wanted = (num_ensemble, *per_region, *spatial)
            if np.shape(self.init) != wanted:
                region_note = " (members, regions, then the image's axes)" if per_region else ""
                raise DiffSegError(f"the members to refine must have shape {wanted}{region_note}; "
                                   f"got {np.shape(self.init)}")
            init = np.asarray(self.init, np.float32).reshape(num_ensemble, *per_region, *volume)
        if self.marks is not None:
            if np.shape(self.marks) != spatial:
                raise DiffSegError(f"the marks must have the image's shape {spatial}; got {np.shape(self.marks)}")
            marks = np.asarray(self.marks).reshape(volume) if reads_marks else None
        return replace(self, known_mask=known_mask, known_values=known_values, init=init, marks=marks)
