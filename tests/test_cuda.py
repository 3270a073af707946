"""The CUDA paths: the network, the sampler in every precision, and training with the fp16
grad scaler. They need a CUDA GPU; CI and laptops have none, so there they are skipped
(the same code runs on the CPU in test_core and test_cli). They were run on a lent H200;
benchmarks/README.md gives the date and figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint, train
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.geometry import Geometry
from napari_diffseg.inference import Segmenter, resolve_precision, run_to_end
from napari_diffseg.options import SamplingOptions
from napari_diffseg.synthetic import write_phantoms
from napari_diffseg.unet import UNet, UNetConfig
from support import TINY as TINY_CORE
from support import tiny_model as tiny_core_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# test_core's tiny UNet, with attention and the demo model's 8 norm groups: every block type
CUDA_TINY = dict(attention_resolutions="16", norm_groups=8)
TINY = {**TINY_CORE, **CUDA_TINY}
TINY_FLAGS = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
              "--attention_resolutions", "16", "--learn_sigma", "True", "--num_heads", "1", "--norm_groups", "8",
              "--crop_border", "0", "--resize_to", "32"]


def tiny_model(seed: int = 0) -> UNet:
    return tiny_core_model(seed, **CUDA_TINY)


@pytest.fixture
def exact_cuda():
    """fp32 on the GPU as on the CPU: cuDNN would otherwise use TF32 for convolutions."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_unet_on_cuda_matches_the_cpu(exact_cuda):
    model = tiny_model()
    x = torch.rand(3, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        on_cpu = model(x, t)
        on_gpu = model.to("cuda")(x.cuda(), t.cuda()).cpu()
        layout = model.to(memory_format=torch.channels_last)(
            x.cuda().to(memory_format=torch.channels_last), t.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layout, on_cpu, rtol=1e-4, atol=1e-5)


def write_tiny_checkpoint(path):
    state = {k: v.detach().clone() for k, v in tiny_model().state_dict().items()}
    checkpoint.atomic_save(checkpoint.make_payload(UNetConfig(**TINY), DiffusionConfig(), Geometry(resize_to=32),
                                                   {"model": state}), path)
    return path


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return Segmenter.load(write_tiny_checkpoint(tmp_path_factory.mktemp("cuda") / "tiny.pt"), device="cuda")


def test_fp16_and_bf16_are_accepted_on_cuda():
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"


def test_segmenter_on_cuda_every_precision(segmenter, exact_cuda):
    images = np.random.default_rng(0).random((4, 40, 48)).astype(np.float32)
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        results[precision] = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=3, respacing="5",
                                                                              precision=precision, seed=1)))
        result = results[precision]
        assert result.settings["precision"] == precision
        assert result.probability.shape == result.variance.shape == (40, 48)
        assert result.samples.shape == (3, 40, 48) and np.isfinite(result.samples).all()
        assert (result.variance >= 0).all() and result.variance.max() > 0  # the chains differ
    again = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=3, respacing="5", precision="fp32", seed=1)))
    np.testing.assert_allclose(again.samples, results["fp32"].samples, atol=1e-5)
    for precision in ("bf16", "fp16"):
        difference = np.abs(results[precision].samples - results["fp32"].samples)
        assert 0 < difference.max() < 0.1, precision  # reduced arithmetic ran and stays close


def test_volume_on_cuda_equals_its_slices_run_alone(segmenter, exact_cuda):
    volume = np.random.default_rng(2).random((4, 32, 32, 3)).astype(np.float32)
    whole = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2, respacing="4", batch_slices=3, seed=3)))
    alone = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2, respacing="4", seed=3), slices=[1]))
    np.testing.assert_allclose(alone.probability[..., 1], whole.probability[..., 1], atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_on_cuda_in_reduced_precision(tmp_path, precision):
    """fp16 goes through the grad scaler, which only exists on CUDA."""
    write_phantoms(tmp_path / "data", 2, seed=0, size=64)  # resized to 32
    out = tmp_path / "run"
    argv = ["--data_dir", str(tmp_path / "data"), "--out_dir", str(out), *TINY_FLAGS, "--batch_size", "4",
            "--device", "cuda", "--precision", precision, "--channels_last", "--no_progress"]
    trainer = train.Trainer(train.build_parser().parse_args(argv))
    assert (trainer.scaler is not None) == (precision == "fp16")
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    losses = [trainer.train_step()["loss"] for _ in range(4)]
    assert all(np.isfinite(losses))
    after = trainer.model.state_dict()
    assert next(iter(after.values())).device.type == "cuda"
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimiser stepped


def test_compiled_network_on_cuda_gives_the_same_chains(tmp_path, exact_cuda):
    """--compile: CUDA graphs replayed by torch.compile, the same maths as the plain network."""
    path = write_tiny_checkpoint(tmp_path / "tiny.pt")
    images = np.random.default_rng(4).random((4, 32, 32)).astype(np.float32)
    plain = run_to_end(Segmenter.load(path, device="cuda").run(images, SamplingOptions(num_ensemble=3, respacing="5",
                                                                                       seed=2)))
    compiled = Segmenter.load(path, device="cuda", compile=True)
    for _ in range(2):  # the second run replays the recorded graphs
        result = run_to_end(compiled.run(images, SamplingOptions(num_ensemble=3, respacing="5", seed=2)))
        np.testing.assert_allclose(result.samples, plain.samples, atol=1e-3)
