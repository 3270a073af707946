"""How slices of any size become network inputs, and how results go back.

A model records its geometry in its checkpoint, so every caller hands over data at its own
size and gets results in the input's geometry: the reference crops 8 pixels from each
edge (240 -> 224); a low-resolution model pads to a square and resamples to its size;
otherwise the slice is padded up to a multiple of the UNet's downsampling factor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import DiffSegError


def _center_pad(x: torch.Tensor, height: int, width: int, value: float = 0.0) -> torch.Tensor:
    dh, dw = height - x.shape[-2], width - x.shape[-1]
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=value)


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Geometry:
    crop_border: int = 0  # pixels dropped at every edge first (the reference: 8)
    resize_to: int | None = None  # the square size a low-resolution model works at

    @classmethod
    def reference(cls) -> "Geometry":
        return cls(crop_border=8)

    @classmethod
    def from_dict(cls, values: dict) -> "Geometry":
        return cls(int(values.get("crop_border", 0)), values.get("resize_to"))

    def to_dict(self) -> dict:
        return asdict(self)

    def _cropped(self, height: int, width: int) -> tuple[int, int]:
        b = self.crop_border
        if height <= 2 * b or width <= 2 * b:
            raise DiffSegError(f"a {height}x{width} slice is too small for a {b}-pixel border crop "
                               "(crop_border, stored in the model): crop less, or give larger slices")
        return height - 2 * b, width - 2 * b

    def network_size(self, height: int, width: int, multiple: int) -> tuple[int, int]:
        if self.resize_to:
            return self.resize_to, self.resize_to
        h, w = self._cropped(height, width)
        return _round_up(h, multiple), _round_up(w, multiple)

    def to_network(self, x: torch.Tensor, multiple: int, is_mask: bool = False) -> torch.Tensor:
        """(B, C, H, W) at the data's size -> (B, C, h, w) at the network's."""
        b = self.crop_border
        if b:
            self._cropped(*x.shape[-2:])  # a clear error, not an empty tensor, for too large a crop
            x = x[..., b:-b, b:-b]
        if self.resize_to:
            side = max(x.shape[-2:])
            x = _center_pad(x, side, side)
            if side != self.resize_to:
                x = F.interpolate(x.float(), size=(self.resize_to, self.resize_to), mode="bilinear",
                                  antialias=True, align_corners=False)
                if is_mask:  # a resampled mask is an area fraction: keep the majority
                    x = (x > 0.5).float()
            return x
        h, w = x.shape[-2:]
        return _center_pad(x, _round_up(h, multiple), _round_up(w, multiple))

    def from_network(self, y: torch.Tensor, height: int, width: int, fill: float = 0.0) -> torch.Tensor:
        """(B, C, h, w) network-sized results -> (B, C, height, width) in the data's geometry.
        Pixels the network never saw (the cropped border) get ``fill``."""
        h, w = self._cropped(height, width)
        if self.resize_to:
            side = max(h, w)
            if side != y.shape[-1]:
                y = F.interpolate(y.float(), size=(side, side), mode="bilinear", align_corners=False)
        y = _center_crop(y, h, w)
        b = self.crop_border
        if b:
            y = F.pad(y, (b, b, b, b), value=fill)
        return y
