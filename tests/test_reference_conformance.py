"""Number-for-number agreement with files produced by the public reference implementation."""

import json

import numpy as np
import pytest
import torch

from napari_diffseg.diffusion import Diffusion, DiffusionConfig, space_timesteps
from napari_diffseg.unet import UNet, UNetConfig, count_parameters


def _read_keys(path):
    rows = []
    for line in path.read_text().splitlines():
        key, shape = line.split(" ", 1)
        rows.append((key, tuple(int(s) for s in shape.strip("()").replace(" ", "").split(",") if s)))
    return rows


@pytest.fixture(scope="module")
def reference_flags(reference_dir):
    return json.loads((reference_dir / "flags.json").read_text())


@pytest.fixture(scope="module")
def small_model(reference_dir, reference_flags):
    model = UNet(UNetConfig.from_flags(reference_flags))
    model.load_state_dict(torch.load(reference_dir / "savedmodel000300.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def forward_fixture(reference_dir):
    return torch.load(reference_dir / "forward_fixture.pt", weights_only=True)


@pytest.fixture(scope="module")
def diffusion_fixture(reference_dir):
    return torch.load(reference_dir / "diffusion_fixture.pt", weights_only=True)


@pytest.mark.parametrize(
    "config, overrides, params",
    [("small", {}, 4_850_274), ("paper", {"num_channels": 128, "num_res_blocks": 2}, 113_674_370)],
)
def test_state_dict_keys_and_shapes_match_reference(shared_dir, reference_flags, config, overrides, params):
    expected = _read_keys(shared_dir / "reference" / f"{config}_config_state_dict_keys.txt")
    model = UNet(UNetConfig.from_flags({**reference_flags, **overrides}))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected
    assert count_parameters(model) == params


def test_forward_pass_matches_reference(small_model, forward_fixture):
    with torch.no_grad():
        out = small_model(forward_fixture["x"], forward_fixture["t"])
    assert out.shape == forward_fixture["out"].shape
    assert (out - forward_fixture["out"]).abs().max().item() <= 1e-4


def test_conditioned_forward_equals_concatenated_forward(small_model, forward_fixture):
    """The split stem (images encoded once, chains batched) is the same function."""
    x = forward_fixture["x"]
    with torch.no_grad():
        condition = small_model.encode_condition(x[:, :4])
        out = small_model.forward_conditioned(x[:, 4:], forward_fixture["t"], condition)
    assert (out - forward_fixture["out"]).abs().max().item() <= 1e-4


def test_schedule_matches_reference(diffusion_fixture):
    diffusion = Diffusion.from_config(DiffusionConfig())
    for name, expected in diffusion_fixture["schedule_1000"].items():
        np.testing.assert_allclose(diffusion.arrays[name], expected.numpy(), rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance_matches_reference(forward_fixture, diffusion_fixture, clip):
    diffusion = Diffusion.from_config(DiffusionConfig())
    x_t = forward_fixture["x"][:, -1:]
    out = diffusion.p_mean_variance(forward_fixture["out"], x_t, diffusion_fixture["t"], clip=clip)
    if clip:
        expected = {k: diffusion_fixture[f"pmv_{k}"] for k in ("mean", "variance", "log_variance")}
        expected["pred_x0"] = diffusion_fixture["pmv_pred_xstart"]
    else:
        expected = {"mean": diffusion_fixture["pmv_noclip_mean"], "pred_x0": diffusion_fixture["pmv_noclip_pred_xstart"]}
    for key, value in expected.items():
        assert (out[key] - value).abs().max().item() <= 1e-5, key


def test_p_sample_matches_reference(forward_fixture, diffusion_fixture):
    diffusion = Diffusion.from_config(DiffusionConfig())
    x_t = forward_fixture["x"][:, -1:]
    t = diffusion_fixture["t"]
    out = diffusion.p_mean_variance(forward_fixture["out"], x_t, t, clip=True)
    torch.manual_seed(1)
    noise = torch.randn_like(x_t)
    sample = diffusion.ddpm_step(out, t, noise)
    assert (sample - diffusion_fixture["p_sample_seed1_sample"]).abs().max().item() <= 1e-5
    assert (out["pred_x0"] - diffusion_fixture["p_sample_seed1_pred_xstart"]).abs().max().item() <= 1e-5


def test_training_loss_matches_reference(small_model, diffusion_fixture):
    fx = diffusion_fixture["train"]
    diffusion = Diffusion.from_config(DiffusionConfig())
    images, mask = fx["x_start"][:, :4], (fx["x_start"][:, 4:] > 0).float()
    t, noise = fx["t"], fx["noise"]
    x_t = diffusion.q_sample(mask, t, noise)
    with torch.no_grad():
        output = small_model(torch.cat([images, x_t.float()], dim=1), t)
    assert (output[:, :1] - fx["model_output_eps"]).abs().max().item() <= 1e-4
    losses = diffusion.training_losses(output, mask, x_t, t, noise)
    for key in ("mse", "vb", "loss"):
        np.testing.assert_allclose(losses[key].double().numpy(), fx[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("spec", ["ddim50", "50"])
def test_respaced_diffusion_matches_reference(small_model, forward_fixture, diffusion_fixture, spec):
    fx = diffusion_fixture[f"respaced_{spec}"]
    diffusion = Diffusion.from_config(DiffusionConfig(), respacing=spec)
    assert diffusion.timestep_map == fx["timestep_map"].tolist()
    np.testing.assert_allclose(diffusion.arrays["betas"], fx["betas"].numpy(), rtol=1e-10)
    np.testing.assert_allclose(diffusion.arrays["alphas_cumprod"], fx["alphas_cumprod"].numpy(), rtol=1e-10)
    t = fx["t_respaced"]
    model_t = diffusion.model_timesteps(t, 2, torch.device("cpu"))
    assert model_t.tolist() == fx["t_original"].tolist()
    # The network sees the original timesteps, which differ from the forward fixture's.
    x = forward_fixture["x"]
    with torch.no_grad():
        output = small_model(x, model_t)
    out = diffusion.p_mean_variance(output, x[:, -1:], t, clip=True)
    for key, ref_key in [("mean", "pmv_mean"), ("variance", "pmv_variance"),
                         ("log_variance", "pmv_log_variance"), ("pred_x0", "pmv_pred_xstart")]:
        assert (out[key] - fx[ref_key]).abs().max().item() <= 1e-4, key


def test_space_timesteps_forms():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    fifty = space_timesteps(1000, "50")
    assert len(fifty) == 50 and fifty[0] == 0 and fifty[-1] == 999 and fifty[:4] == [0, 20, 41, 61]
    sections = space_timesteps(1000, "10,5")
    assert len(sections) == 15 and sections[9] == 499 and sections[10] == 500 and sections[-1] == 999
    assert len(space_timesteps(1000, "250")) == 250
    assert space_timesteps(1000, "1000") == list(range(1000))
