"""Metrics against answers worked out by hand or by brute force on small arrays."""

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_diffseg.metrics import (auroc, dice, hd95, neighbourhood, pearson,
                                    variance_error_auroc)


def square(shape=(40, 40), top=10, left=10, side=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


# --- dice -----------------------------------------------------------------------------


def test_dice_of_two_overlapping_squares():
    # 10x10 squares shifted by 3 rows overlap in 7x10 = 70 pixels: 2 * 70 / 200.
    assert dice(square(top=10), square(top=13)) == pytest.approx(0.7)


def test_dice_edge_cases():
    empty = np.zeros((5, 5), bool)
    assert dice(empty, empty) == 1.0
    assert dice(square((5, 5), 1, 1, 2), empty) == 0.0
    assert dice(square(), square()) == 1.0
    # 0/1 integer arrays and 3D volumes work the same way
    volume = np.zeros((4, 4, 4), np.uint8)
    volume[1:3, 1:3, 1:3] = 1
    assert dice(volume, volume) == 1.0


def test_dice_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


# --- hd95 -----------------------------------------------------------------------------


def test_hd95_of_shifted_square_honours_spacing():
    # Shifting a 10x10 square by 3 rows puts 10 of its 36 edge pixels 3 rows from the other
    # edge, and no edge pixel further: both 95th percentiles are 3 rows.
    a, b = square(top=10), square(top=13)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)  # rows are 2 mm
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(3.0)  # columns do not matter
    assert hd95(a, b, spacing=0.5) == pytest.approx(1.5)


def test_hd95_empty_masks():
    empty = np.zeros((10, 10), bool)
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(square((10, 10), 2, 2, 3), empty))
    assert math.isnan(hd95(empty, square((10, 10), 2, 2, 3)))


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Edges as mask minus its erosion; every edge-to-edge distance; 95th percentile of each
    direction, the larger one."""
    def edge_points(mask):
        edges = mask & ~ndimage.binary_erosion(mask)
        return np.argwhere(edges) * np.asarray(spacing)

    pa, pb = edge_points(a), edge_points(b)
    distances = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.5, 0.7)])
def test_hd95_matches_brute_force_on_random_blobs(spacing):
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 3) > 0.05
        b = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 3) > 0.05
        a[0], a[-1], a[:, 0], a[:, -1] = False, False, False, False  # keep edges inside
        b[0], b[-1], b[:, 0], b[:, -1] = False, False, False, False
        assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), rel=1e-5)


def test_hd95_in_3d_with_anisotropic_voxels():
    a = np.zeros((12, 12, 12), bool)
    a[3:8, 3:8, 3:8] = True
    b = np.roll(a, 2, axis=2)  # 2 slices along the 3 mm axis
    assert hd95(a, b, spacing=(1.0, 1.0, 3.0)) == pytest.approx(6.0)


# --- auroc ----------------------------------------------------------------------------


def test_auroc_hand_cases():
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.7, 0.1, 0.2]), labels) == 0.0
    assert auroc(np.full(5, 0.5), labels) == 0.5
    # one positive tied with one of three negatives, above the other two: (2 + 0.5) / 3
    assert auroc(np.array([0.1, 0.2, 0.5, 0.5]), np.array([0, 0, 0, 1])) == pytest.approx(2.5 / 3)


def test_auroc_single_class_is_nan_and_nan_scores_are_skipped():
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))
    assert auroc(np.array([0.1, np.nan, 0.9]), np.array([0, 1, 1])) == 1.0


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3 + 0.1 * scores
    positive, negative = scores[labels], scores[~labels]
    above = (positive[:, None] > negative[None, :]).sum()
    tied = (positive[:, None] == negative[None, :]).sum()
    wins = above + 0.5 * tied
    assert auroc(scores, labels) == pytest.approx(wins / (positive.size * negative.size))


# --- neighbourhood and variance/error AUROC ---------------------------------------------


def test_neighbourhood_radius():
    truth = np.zeros((21, 21), bool)
    truth[10, 10] = True
    near = neighbourhood(np.zeros_like(truth), truth, radius=3)
    i, j = np.indices(truth.shape)
    np.testing.assert_array_equal(near, np.hypot(i - 10, j - 10) <= 3)
    assert near[10, 13] and near[12, 12] and not near[10, 14] and not near[13, 13]


def test_neighbourhood_takes_union_and_handles_empty():
    pred, truth = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    assert not neighbourhood(pred, truth).any()
    pred[2, 2], truth[27, 27] = True, True
    near = neighbourhood(pred, truth, radius=2)
    assert near[2, 4] and near[27, 25] and not near[15, 15]
    volume = np.zeros((9, 9, 9), bool)
    volume[4, 4, 4] = True
    assert neighbourhood(volume, volume, radius=2).sum() == 33  # lattice points in a radius-2 ball


def test_variance_error_auroc():
    truth = square((30, 30), 10, 10, 10)
    pred = square((30, 30), 10, 12, 10)  # errors in two 10x2 strips
    errors = pred != truth
    variance = errors.astype(float)  # a perfect error detector
    result = variance_error_auroc(variance, pred, truth, radius=3)
    assert result == {"neighbourhood": 1.0, "all": 1.0}
    # variance that marks errors and their neighbours: worse near the tumour than overall
    blurred = ndimage.uniform_filter(variance, 5)
    result = variance_error_auroc(blurred, pred, truth, radius=3)
    assert 0.5 < result["neighbourhood"] < result["all"] <= 1.0


# --- pearson --------------------------------------------------------------------------


def test_pearson():
    x = np.arange(10.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    with_gaps = pearson(np.array([1.0, np.nan, 3.0, 4.0]), np.array([2.0, 5.0, np.inf, 8.0]))
    assert with_gaps == pytest.approx(1.0)  # only the pairs (1, 2) and (4, 8) count
    assert math.isnan(pearson(np.ones(5), x[:5]))
    assert math.isnan(pearson(np.array([1.0]), np.array([2.0])))
