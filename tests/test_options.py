"""The sampling options and the guidance: each checks itself once, where it is made."""

import numpy as np
import pytest

from napari_diffseg import cli
from napari_diffseg.errors import DiffSegError
from napari_diffseg.options import Guidance, SamplingOptions


@pytest.mark.parametrize("given, words", [
    (dict(num_ensemble=0), "ensemble size must be at least 1"),
    (dict(sampler="euler"), "sampler 'euler' is unknown"),
    (dict(eta=-0.5), "eta -0.5"),
    (dict(precision="fp64"), "precision 'fp64' is unknown"),
    (dict(batching="many"), "batching 'many'"),
    (dict(batch_slices=0), "slices per batch"),
])
def test_bad_sampling_options_are_refused_where_they_are_made(given, words):
    with pytest.raises(DiffSegError, match=words):
        SamplingOptions(**given)


def test_resolved_options_take_the_models_defaults_where_none_is_given():
    stored = {"num_ensemble": 5, "timestep_respacing": "10", "sampler": "ddim"}
    options = SamplingOptions(sampler="").resolved(stored, "fp32", "auto", deterministic=False)
    assert (options.num_ensemble, options.respacing, options.sampler, options.precision, options.batching,
            options.seed) == (5, "10", "ddim", "fp32", "auto", 0)
    given = SamplingOptions(3, respacing="", sampler="ddpm", batching="4", seed=None)
    options = given.resolved(stored, "bf16", "auto", deterministic=False)
    assert (options.num_ensemble, options.respacing, options.sampler, options.batching) == (3, "", "ddpm", 4)
    assert isinstance(options.seed, int)  # a fresh one
    assert given.resolved(stored, "fp32", "auto", deterministic=True).num_ensemble == 1  # the one-pass U-Net


def test_guidance_checks_itself_and_against_the_input():
    with pytest.raises(DiffSegError, match="both a mask and their values"):
        Guidance(known_mask=np.zeros((4, 4), bool))
    with pytest.raises(DiffSegError, match="resample must be at least 1"):
        Guidance(resample=0)
    with pytest.raises(DiffSegError, match="need the step they start from"):
        Guidance(init=np.zeros((2, 4, 4)))
    known = Guidance(known_mask=np.ones((4, 4), bool), known_values=np.ones((4, 4)))
    with pytest.raises(DiffSegError, match="image's shape"):
        known.for_volume((4, 5), 2, deterministic=False, reads_marks=False)
    with pytest.raises(DiffSegError, match="one-pass U-Net"):
        known.for_volume((4, 4), 1, deterministic=True, reads_marks=False)
    volume = known.for_volume((4, 4), 2, deterministic=False, reads_marks=False)
    assert volume.known_mask.shape == (4, 4, 1) and volume.known_values.dtype == np.float32
    marks = Guidance(marks=np.ones((4, 4, 3), np.uint8))
    assert marks.for_volume((4, 4, 3), 2, False, reads_marks=False).marks is None  # a model without mark channels
    assert marks.for_volume((4, 4, 3), 2, False, reads_marks=True).marks.shape == (4, 4, 3)
    with pytest.raises(DiffSegError, match="members to refine must have shape"):
        Guidance(init=np.zeros((3, 4, 4)), start_step=2).for_volume((4, 4), 2, False, False)


def test_the_command_line_names_the_flag_of_a_bad_option():
    with pytest.raises(DiffSegError) as info:
        SamplingOptions(num_ensemble=0)
    assert cli.error_text(info.value).startswith("--num_ensemble: ")
