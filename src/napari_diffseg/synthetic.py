"""Synthetic brain-tumour phantoms: 4-modality MRI slices with a known tumour mask.

A phantom is a 2D axial slice: a head (scalp fat, skull, outer CSF) around a brain with
grey matter, white matter, deep grey nuclei, sulci and lateral ventricles, and (in most
cases) a tumour made of necrotic or non-enhancing core, enhancing rim and oedema.

The phantoms exist to test and demonstrate training without real data, so they are built
to be learnable but not trivial:

* every tumour compartment looks like some healthy tissue in at least one modality
  (oedema ~ grey matter in t1, necrosis ~ CSF in t1 and t2, rim ~ scalp fat in t1ce,
  oedema ~ white-matter lesions in flair), scalp fat is as bright as the tumour in t2 and
  flair, CSF brighter in t2, and the tumour's compartments sit on both sides of healthy
  tissue in every modality, so one threshold on one modality always catches healthy
  tissue or misses tumour;
* the joint pattern over the four modalities is still distinct for every compartment
  (oedema: bright in t2 AND flair, below grey matter in t1; white-matter lesions: bright
  in t2 and flair but white-matter-like in t1; CSF: bright in t2 but dark in flair; rim:
  bright in t1ce but not in t1; ...), so a model that sees all four can segment the
  whole tumour;
* contrasts, noise, bias field, blur and geometry are drawn per case, so no fixed
  threshold carries over from one case to the next.

Files follow the reference's slice-folder layout: ``out_dir/<case>/<case>_<modality>.nii.gz``
for the four modalities plus ``<case>_seg.nii.gz`` (BraTS labels 0, 1, 2, 4).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_diffseg import MODALITIES
from napari_diffseg.cli import guarded, make_parser
from napari_diffseg.data import save_nifti
from napari_diffseg.errors import DiffSegError

# BraTS labels; whole tumour is label > 0.
NECROTIC_CORE, OEDEMA, ENHANCING = 1, 2, 4

# Tissue classes of the hidden anatomy map (rows of the contrast table).
(BACKGROUND, SCALP, BONE, CSF, GREY, WHITE, NUCLEI, WM_LESION, TUMOUR_OEDEMA, TUMOUR_RIM,
 TUMOUR_NECROSIS, TUMOUR_SOLID) = range(12)
N_TISSUES = 12

# Share of cases that get a tumour, and of tumours without an enhancing rim
# (low-grade-like: a non-enhancing solid core inside oedema).
P_TUMOUR = 0.92
P_NON_ENHANCING = 0.2

AFFINE = np.eye(4)  # 1 mm isotropic, like the reference's slices
MIN_SIZE = 64


def make_phantom(rng_or_seed: np.random.Generator | int, size: int = 240) -> dict[str, np.ndarray]:
    """One phantom slice.

    Returns ``{"images": (4, size, size) float32 in [0, 1] in MODALITIES order,
    "label": (size, size) uint8 BraTS labels}``. An int seeds a fresh generator; pass a
    Generator to continue a stream. Case i of `write_phantoms(..., seed)` is
    ``make_phantom(case_rng(seed, i), size)``.
    """
    rng = np.random.default_rng(rng_or_seed)
    coords = _head_coordinates(rng, size)
    tissue = _anatomy(rng, coords)
    healthy = tissue.copy()
    label = np.zeros((size, size), np.uint8)
    oedema_strength = np.zeros((size, size))
    if rng.random() < P_TUMOUR:
        oedema_strength = _add_tumour(rng, coords, tissue, label)
    images = _render(rng, tissue, healthy, oedema_strength, _contrast_table(rng), coords["head"])
    return {"images": images, "label": label}


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for case `index` of a run with `seed`: independent of the other cases,
    so case i is the same whatever n is."""
    return np.random.default_rng([seed, index])


# --- geometry -------------------------------------------------------------------------


def _harmonics(rng: np.random.Generator, theta: np.ndarray, orders: range,
               amplitude: float) -> np.ndarray:
    """A random smooth periodic function of the angle: irregular but closed outlines."""
    out = np.zeros_like(theta)
    for k in orders:
        out += rng.uniform(0, amplitude) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return out


def _head_coordinates(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Head-centred elliptic coordinates: rho is 1 on the scalp surface, (p, q) are brain
    coordinates where the brain is roughly the unit disc."""
    i, j = np.mgrid[0:size, 0:size].astype(np.float64)
    # Sized so the head stays inside the slice (and mostly inside the reference's
    # [8:-8, 8:-8] crop).
    centre = size / 2 + rng.normal(0, 0.02 * size, 2)
    half_lr = rng.uniform(0.30, 0.36) * size   # left-right semi-axis (array axis 0)
    half_ap = rng.uniform(0.37, 0.42) * size   # antero-posterior semi-axis (array axis 1)
    angle = rng.uniform(-0.25, 0.25)
    x, y = i - centre[0], j - centre[1]
    x, y = np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y
    u, v = x / half_lr, y / half_ap
    theta = np.arctan2(v, u)
    rho = np.hypot(u, v) / (1 + _harmonics(rng, theta, range(2, 5), 0.05))

    scalp = rng.uniform(0.05, 0.09)
    bone = rng.uniform(0.03, 0.05)
    outer_csf = rng.uniform(0.012, 0.03)
    brain_radius = 1 - scalp - bone - outer_csf
    return {
        "rho": rho, "theta": theta, "head": rho < 1,
        "scalp_inner": np.float64(1 - scalp), "bone_inner": np.float64(1 - scalp - bone),
        "brain_radius": np.float64(brain_radius),
        "p": u / brain_radius, "q": v / brain_radius, "r": rho / brain_radius,
        "pixels_per_unit": np.float64(min(half_lr, half_ap) * brain_radius),
    }


def _ellipse(p: np.ndarray, q: np.ndarray, centre: tuple[float, float], axes: tuple[float, float],
             tilt: float) -> np.ndarray:
    dp, dq = p - centre[0], q - centre[1]
    a = np.cos(tilt) * dp + np.sin(tilt) * dq
    b = -np.sin(tilt) * dp + np.cos(tilt) * dq
    return (a / axes[0]) ** 2 + (b / axes[1]) ** 2 < 1


def _anatomy(rng: np.random.Generator, c: dict[str, np.ndarray]) -> np.ndarray:
    """Hidden tissue-class map of a healthy head."""
    rho, theta, p, q, r = c["rho"], c["theta"], c["p"], c["q"], c["r"]
    tissue = np.full(rho.shape, BACKGROUND, np.uint8)
    tissue[c["head"]] = SCALP
    tissue[rho < c["scalp_inner"]] = BONE
    tissue[rho < c["bone_inner"]] = CSF
    brain = r < 1
    # Cortex: a grey ribbon folded into gyri. Sulci (CSF in their middle) sit where the
    # wave peaks; white matter reaches up into each gyrus between them.
    n_sulci = int(rng.integers(14, 24))
    phase = rng.uniform(0, 2 * np.pi)
    meander = 0.7 * np.sin(3 * theta + rng.uniform(0, 6))
    wave = np.cos(n_sulci * theta + phase + meander)
    ribbon = rng.uniform(0.05, 0.08)
    depth = rng.uniform(0.1, 0.2) * (1 + _harmonics(rng, theta, range(2, 6), 0.8))
    white_edge = 1 - ribbon - depth * (0.5 + 0.5 * wave) ** 2
    tissue[brain] = GREY
    tissue[brain & (r < white_edge)] = WHITE
    sulcus_width = rng.uniform(0.88, 0.94)
    tissue[brain & (wave > sulcus_width) & (r > 1 - 0.9 * depth - 0.5 * ribbon)] = CSF
    # Deep grey nuclei and the lateral ventricles (scaled: ventricle size varies with age).
    spread = rng.uniform(0.9, 1.1)
    for side in (-1, 1):
        tissue[_ellipse(p, q, (side * 0.26 * spread, -0.05), (0.09, 0.16), side * 0.2)] = NUCLEI
    scale = rng.uniform(0.6, 1.5)
    shift = rng.normal(0, 0.03, 2)
    for side in (-1, 1):
        body = _ellipse(p, q, (side * 0.1 * scale ** 0.5 + shift[0], 0.05 + shift[1]),
                        (0.045 * scale, 0.3 * scale ** 0.5), side * rng.uniform(0.05, 0.25))
        tissue[body] = CSF
    tissue[_ellipse(p, q, (shift[0], -0.22 + shift[1]), (0.015 * scale, 0.07), 0.0)] = CSF
    _add_white_matter_lesions(rng, c, tissue)
    return tissue


def _add_white_matter_lesions(rng: np.random.Generator, c: dict[str, np.ndarray],
                              tissue: np.ndarray) -> None:
    """Healthy-ageing white-matter hyperintensities: caps around the ventricles and a few
    punctate spots. Bright in t2 and flair like oedema, but white-matter-like in t1: a
    flair threshold inside the brain takes them with the tumour."""
    white = tissue == WHITE
    if rng.random() < 0.8:
        near_ventricle = ndimage.distance_transform_edt(tissue != CSF) * (c["r"] < 0.6)
        cap = rng.uniform(0.02, 0.1) * c["pixels_per_unit"]
        tissue[white & (near_ventricle > 0) & (near_ventricle < cap)] = WM_LESION
    for _ in range(rng.poisson(3.0)):
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.7)
        spot = _ellipse(c["p"], c["q"], (radius * np.cos(angle), radius * np.sin(angle)),
                        tuple(rng.uniform(0.015, 0.06, 2)), rng.uniform(0, np.pi))
        tissue[spot & white] = WM_LESION


def _add_tumour(rng: np.random.Generator, c: dict[str, np.ndarray], tissue: np.ndarray,
                label: np.ndarray) -> np.ndarray:
    """Draw a tumour into the tissue map and the BraTS label map, in place.

    Returns the oedema strength map: 1 near the tumour, fading towards its outer edge
    (where oedema looks more like the tissue it soaks), 0 outside the oedema."""
    p, q, r = c["p"], c["q"], c["r"]
    brain = r < 1
    centre_angle, centre_radius = rng.uniform(0, 2 * np.pi), 0.65 * np.sqrt(rng.uniform())
    cp, cq = centre_radius * np.cos(centre_angle), centre_radius * np.sin(centre_angle)
    # Core plus rim, with an irregular (random-harmonics) outline.
    core_radius = rng.uniform(0.08, 0.26)
    dp, dq = p - cp, q - cq
    angle, distance = np.arctan2(dq, dp), np.hypot(dp, dq)
    outline = core_radius * np.maximum(1 + _harmonics(rng, angle, range(1, 7), 0.5), 0.4)
    tumour = brain & (distance < outline)
    # Oedema spreads further along white matter (finger-like), never into the ventricles.
    op, oq = cp + rng.normal(0, 0.3 * core_radius), cq + rng.normal(0, 0.3 * core_radius)
    oangle, odistance = np.arctan2(q - oq, p - op), np.hypot(p - op, q - oq)
    oedema_radius = core_radius * rng.uniform(1.2, 2.2)
    reach = np.where(tissue == WHITE, 1.15, 0.8) * oedema_radius
    reach *= np.maximum(1 + _harmonics(rng, oangle, range(1, 8), 0.6), 0.3)
    oedema = brain & (odistance < reach) & (tissue != CSF) & ~tumour
    strength = np.where(oedema, 1 - rng.uniform(0.0, 0.35) * np.clip(odistance / reach, 0, 1), 0.0)

    tissue[oedema] = TUMOUR_OEDEMA
    label[oedema] = OEDEMA
    if rng.random() < P_NON_ENHANCING:
        tissue[tumour] = TUMOUR_SOLID
        label[tumour] = NECROTIC_CORE  # BraTS lumps non-enhancing tumour into label 1
        return strength
    # Enhancing rim of varying thickness (at least ~1.5 px) around a necrotic core.
    thickness = max(rng.uniform(0.15, 0.45) * core_radius, 1.5 / c["pixels_per_unit"])
    thickness *= np.maximum(1 + _harmonics(rng, angle, range(1, 5), 0.6), 0.5)
    necrosis = tumour & (distance < outline - thickness)
    tissue[tumour] = TUMOUR_RIM
    label[tumour] = ENHANCING
    tissue[necrosis] = TUMOUR_NECROSIS
    label[necrosis] = NECROTIC_CORE
    return strength


# --- appearance -----------------------------------------------------------------------


def _contrast_table(rng: np.random.Generator) -> np.ndarray:
    """Mean signal of each tissue class in each modality, (N_TISSUES, 4) in MODALITIES order.

    Healthy values follow the usual relative contrasts (t1: WM > GM > CSF; t2 and flair:
    CSF bright in t2, suppressed in flair). Tumour values are drawn relative to the healthy
    ones, so each compartment keeps its joint signature while its single-modality value
    moves across healthy tissues from case to case.
    """
    def jitter(value: float, spread: float = 0.05) -> float:
        return float(value + rng.normal(0, spread))

    t = np.zeros((N_TISSUES, 4))
    #                   t1            t1ce          t2            flair
    t[BONE] = [jitter(0.08, 0.02), jitter(0.08, 0.02), jitter(0.06, 0.02), jitter(0.06, 0.02)]
    t[CSF] = [jitter(0.18), jitter(0.2), jitter(1.0), jitter(0.12, 0.03)]
    t[GREY] = [jitter(0.58), jitter(0.55), jitter(0.6), jitter(0.55)]
    t[WHITE] = [t[GREY, 0] + rng.uniform(0.12, 0.25), t[GREY, 1] + rng.uniform(0.08, 0.2),
                t[GREY, 2] - rng.uniform(0.1, 0.22), t[GREY, 3] - rng.uniform(0.05, 0.15)]
    t[NUCLEI] = 0.5 * (t[GREY] + t[WHITE]) + rng.normal(0, 0.02, 4)
    grey, csf, white = t[GREY], t[CSF], t[WHITE]
    t[WM_LESION] = [white[0] - rng.uniform(0.0, 0.04), white[1] - rng.uniform(0.0, 0.04),
                    white[2] + rng.uniform(0.15, 0.3), grey[3] + rng.uniform(0.1, 0.3)]
    scalp = np.array([jitter(0.95), jitter(0.95)])  # t1, t1ce: the rim must match it
    # Oedema: t1 a bit below grey matter, bright in t2 (below CSF) and flair (near scalp fat).
    t[TUMOUR_OEDEMA] = [grey[0] - rng.uniform(0.03, 0.12), grey[1] - rng.uniform(0.03, 0.12),
                        grey[2] + rng.uniform(0.15, 0.35), grey[3] + rng.uniform(0.18, 0.38)]
    # Enhancing rim: grey-matter-like in t1, as bright as fat in t1ce.
    t[TUMOUR_RIM] = [grey[0] + rng.normal(0, 0.05), scalp[1] + rng.normal(0, 0.05),
                     grey[2] + rng.uniform(0.05, 0.2), grey[3] + rng.uniform(0.1, 0.3)]
    # Necrosis: fluid-like (CSF) in t1, t1ce and t2; in flair only partly suppressed, so
    # darker than oedema but well above CSF.
    t[TUMOUR_NECROSIS] = [csf[0] + rng.uniform(0.0, 0.15), csf[1] + rng.uniform(0.0, 0.15),
                          csf[2] - rng.uniform(0.0, 0.2), grey[3] + rng.uniform(-0.3, 0.0)]
    # Non-enhancing solid tumour: between grey matter and oedema.
    t[TUMOUR_SOLID] = [grey[0] - rng.uniform(0.05, 0.18), grey[1] - rng.uniform(0.05, 0.15),
                       grey[2] + rng.uniform(0.08, 0.25), grey[3] + rng.uniform(0.1, 0.3)]
    # Fat is bright in all four (fast spin echo) and, in flair, at least as bright as the
    # tumour: one threshold on flair cannot take the tumour without the scalp.
    tumour_flair = t[[TUMOUR_OEDEMA, TUMOUR_RIM, TUMOUR_SOLID], 3].max()
    tumour_t2 = t[[TUMOUR_OEDEMA, TUMOUR_RIM, TUMOUR_SOLID], 2].max()
    t[SCALP] = [scalp[0], scalp[1], tumour_t2 + rng.uniform(0.0, 0.12),
                tumour_flair + rng.uniform(0.05, 0.2)]
    return np.clip(t, 0.0, 1.2)


def _bias_fields(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth multiplicative fields (4, size, size): a shared coil profile plus a per-modality
    part. The log-field is scaled to a drawn spread (standard deviation 5-10 %, so about
    +-10-25 % across the head): strong enough to shift healthy tissue into the tumour's
    range elsewhere in the slice, mild enough to stay a smooth shading."""
    x = np.linspace(-1, 1, size)
    i, j = np.meshgrid(x, x, indexing="ij")
    basis = np.stack([i, j, i * j, i ** 2 - 0.5, j ** 2 - 0.5,
                      np.cos(np.pi * i), np.cos(np.pi * j)])

    def field() -> np.ndarray:
        return np.tensordot(rng.normal(0, 1, len(basis)), basis, axes=1)

    shared = field()
    spread = rng.uniform(0.05, 0.1)
    fields = []
    for _ in MODALITIES:
        log_field = shared + 0.6 * field()
        fields.append(np.exp(spread * (log_field - log_field.mean()) / log_field.std()))
    return np.stack(fields)


def _render(rng: np.random.Generator, tissue: np.ndarray, healthy: np.ndarray,
            oedema_strength: np.ndarray, table: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Tissue map -> (4, H, W) float32 images in [0, 1].

    Order matters: blur first (partial volume of the true anatomy), then the coil's bias
    field, then Rician noise (magnitude of complex Gaussian noise, as in real magnitude
    images), then per-image scaling like the BraTS preprocessing (robust max -> 1).
    """
    size = tissue.shape[0]
    blur = rng.uniform(0.5, 1.1)
    noise = rng.uniform(0.025, 0.06)
    bias = _bias_fields(rng, size)
    images = np.empty((len(MODALITIES), size, size), np.float32)
    for m in range(len(MODALITIES)):
        clean = table[tissue, m]
        # Faint oedema is a mix of oedema and the tissue it soaks.
        clean = np.where(tissue == TUMOUR_OEDEMA,
                         oedema_strength * clean + (1 - oedema_strength) * table[healthy, m], clean)
        signal = ndimage.gaussian_filter(clean, blur) * bias[m]
        sigma = noise * rng.uniform(0.8, 1.25)
        real = signal + rng.normal(0, sigma, signal.shape)
        imaginary = rng.normal(0, sigma, signal.shape)
        magnitude = np.hypot(real, imaginary)
        robust_max = np.percentile(magnitude[head], 99.5)
        images[m] = np.clip(magnitude / robust_max, 0, 1)
    return images


# --- how hard is it? ------------------------------------------------------------------


def best_single_modality_dice(images: np.ndarray, label: np.ndarray) -> float:
    """Best whole-tumour Dice any single threshold on any single modality reaches.

    Every distinct threshold is tried in both directions (image > t and image < t), exactly:
    pixels are sorted once per modality and direction, and Dice is evaluated at each cut
    between distinct values. This is an oracle (the threshold is chosen knowing the
    truth), so it is an upper bound on what a per-case threshold can do.
    Returns nan when the slice has no tumour (the question does not arise).
    """
    truth = np.asarray(label).reshape(-1) > 0
    n_truth = int(truth.sum())
    if n_truth == 0:
        return float("nan")
    best = 0.0
    for image in np.asarray(images).reshape(len(images), -1):
        for direction in (-1.0, 1.0):  # -1: brightest first (image > t); +1: darkest first
            order = np.argsort(direction * image, kind="stable")
            values = image[order]
            true_positives = np.cumsum(truth[order])
            # A threshold can only cut where the value changes (ties go together).
            cut = np.flatnonzero(np.append(values[1:] != values[:-1], True))
            n_selected = cut + 1
            dice = 2.0 * true_positives[cut] / (n_selected + n_truth)
            best = max(best, float(dice.max()))
    return best


# --- files ----------------------------------------------------------------------------


def write_phantoms(out_dir: str | os.PathLike, n: int, seed: int, size: int = 240) -> list[Path]:
    """Write `n` phantom cases under `out_dir` (created if needed); returns the case folders."""
    return [folder for folder, _ in _generate(out_dir, n, seed, size)]


def _generate(out_dir: str | os.PathLike, n: int, seed: int,
              size: int) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
    """Make, write and yield (case folder, phantom) one case at a time."""
    if n < 1:
        raise DiffSegError(f"--n {n}: need at least 1 case")
    if size < MIN_SIZE:
        raise DiffSegError(f"--size {size}: need at least {MIN_SIZE} pixels")
    if seed < 0:
        raise DiffSegError(f"--seed {seed}: use a seed >= 0")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiffSegError(f"--out_dir {out_dir}: cannot create it ({error.strerror}); "
                           "choose a writable folder") from None
    for index in range(n):
        case = f"phantom_{index:04d}"
        folder = out_dir / case
        phantom = make_phantom(case_rng(seed, index), size)
        for modality, image in zip(MODALITIES, phantom["images"]):
            save_nifti(folder / f"{case}_{modality}.nii.gz", image, AFFINE, dtype=np.float32)
        save_nifti(folder / f"{case}_seg.nii.gz", phantom["label"], AFFINE, dtype=np.uint8)
        yield folder, phantom


# --- command line ---------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    """Bad flags become DiffSegError, so every user error is one line (not usage + error)
    and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DiffSegError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("diffseg-phantoms", __doc__.splitlines()[0], parser_class=_ArgumentParser)
    parser.add_argument("--out_dir", required=True, help="folder for the case folders")
    parser.add_argument("--n", type=int, default=16, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=240, help="slice size in pixels")
    return parser


@guarded  # DiffSegError -> one line on stderr, exit status 2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fractions, dices = [], []
    for _, phantom in _generate(args.out_dir, args.n, args.seed, args.size):
        fractions.append(float(np.mean(phantom["label"] > 0)))
        dices.append(best_single_modality_dice(phantom["images"], phantom["label"]))

    with_tumour = [d for d in dices if not np.isnan(d)]
    cases = "case" if args.n == 1 else "cases"
    print(f"wrote {args.n} {cases} ({args.size}x{args.size}, seed {args.seed}) to {args.out_dir}")
    print(f"cases with tumour: {len(with_tumour)}/{args.n}; tumour fraction mean "
          f"{100 * np.mean(fractions):.1f} %, max {100 * np.max(fractions):.1f} %")
    if with_tumour:
        print(f"best single-modality threshold Dice (oracle, cases with tumour): "
              f"mean {np.mean(with_tumour):.3f}, max {np.max(with_tumour):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
