"""Does a trained model see a uniform offset of the noisy mask? (docs/evaluation/README.md)

Adds a constant to every pixel of x_t and prints how far the mean predicted noise moves, next
to what it must move for the x0 estimate to stay put (offset / sqrt(1 - alpha_bar_t)). A model
that cannot see the offset (ratio near 0) lets sampling chains drift to all-tumour.

    python scripts/check_level_response.py [--model_path runs/demo/model.pt] [--offset 1.0]
"""

import argparse

import numpy as np
import torch

from napari_diffseg.checkpoint import load_model
from napari_diffseg.diffusion import Diffusion
from napari_diffseg.synthetic import make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="default: the bundled demo model")
    parser.add_argument("--offset", type=float, default=1.0)
    parser.add_argument("--timesteps", default="900,500,200,50")
    args = parser.parse_args()
    loaded = load_model(args.model_path)
    model = loaded.model.eval()
    alphas_cumprod = Diffusion.from_config(loaded.diffusion_config, "").arrays["alphas_cumprod"]
    images = torch.from_numpy(make_phantom(3)["images"]).float()[None]
    images = loaded.geometry.to_network(images, loaded.unet_config.size_multiple)
    noise = torch.randn((1, 1, *images.shape[-2:]), generator=torch.Generator().manual_seed(0))
    print(f"model: {loaded.source}, norm_groups {loaded.unet_config.norm_groups}")
    print(f"{'t':>5} {'noise moved':>12} {'must move':>10} {'ratio':>6}")
    with torch.inference_mode():
        for t in (int(v) for v in args.timesteps.split(",")):
            step = torch.tensor([t])
            base = model(torch.cat([images, noise], 1), step)[:, :1].mean()
            moved = model(torch.cat([images, noise + args.offset], 1), step)[:, :1].mean() - base
            needed = args.offset / np.sqrt(1.0 - alphas_cumprod[t])
            print(f"{t:>5} {float(moved):>12.3f} {needed:>10.3f} {float(moved) / needed:>6.2f}")


if __name__ == "__main__":
    main()
