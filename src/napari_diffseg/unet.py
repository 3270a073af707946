"""The denoising UNet of improved-diffusion, as the reference configures it.

Module names, order and parameter shapes are chosen so that ``state_dict`` keys equal the
reference's for the same flags: a checkpoint written by the reference's training loads
unchanged. The conditioning images enter as extra input channels in front of the noisy mask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# channel_mult implied by image_size when the flag is empty (the reference's table).
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


@dataclass
class UNetConfig:
    """Model flags under the reference's names and with its defaults."""

    image_size: int = 256
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 1
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16"
    channel_mult: str = ""
    dropout: float = 0.0
    learn_sigma: bool = True
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    in_channels: int = 5
    # Not a reference flag (it fixes 32). With one channel per group, as at 32 channels, every
    # norm removes each feature map's spatial mean, and the network cannot see a uniform offset
    # of the noisy mask: chains then drift to all-tumour unchecked. Fewer groups keep it visible.
    norm_groups: int = 32
    # Not a reference flag: one more input channel, the previous step's x0 estimate (Chen et
    # al., Analog Bits): each step sees what the chain already decided.
    self_condition: bool = False
    # Not a reference flag: input channels for the user's marks (tumour, not tumour), so a
    # refine can tell a mark from the model's own state; they come last in the first layer.
    hint_channels: int = 0
    # Not a reference flag: the mask's channels, one per region the model segments (1: whole
    # tumour; 3: WT, TC, ET, ``diffseg-train --regions brats``). in_channels counts them.
    mask_channels: int = 1

    @classmethod
    def from_flags(cls, flags: dict) -> "UNetConfig":
        """Build from a flag dict that may hold other (diffusion, training) keys too."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flags.items() if k in names})

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.mask_channels == 1:
            # A one-mask model is written as before regions existed, so that its configuration
            # (and the batching choices stored under its hash) stays the same.
            del values["mask_channels"]
        return values

    @property
    def out_channels(self) -> int:
        """The mask estimate per mask channel, then (learn_sigma) the variance value per channel."""
        return self.mask_channels * (2 if self.learn_sigma else 1)

    @property
    def cond_channels(self) -> int:
        return self.in_channels - self.mask_channels

    @property
    def stem_channels(self) -> int:
        """Input channels of the first layer: images, noisy mask, x0 estimate if self-conditioned
        (one per mask channel), then the marks' channels."""
        return self.in_channels + int(self.self_condition) * self.mask_channels + self.hint_channels

    @property
    def mults(self) -> tuple[float, ...]:
        if self.channel_mult:
            return tuple(float(m) if "." in m else int(m) for m in self.channel_mult.split(","))
        if self.image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"image_size {self.image_size} has no default channel_mult; "
                f"give channel_mult (e.g. 1,2,2,4) or use one of {sorted(_DEFAULT_CHANNEL_MULT)}"
            )
        return _DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def attention_ds(self) -> set[int]:
        # The flag lists feature-map resolutions relative to image_size.
        return {self.image_size // int(r) for r in self.attention_resolutions.split(",") if r.strip()}

    @property
    def size_multiple(self) -> int:
        """Inputs must be divisible by this (one factor of 2 per downsampling)."""
        return 2 ** (len(self.mults) - 1)


# The reference's network flags with its defaults (guided-diffusion's model_and_diffusion_defaults
# as the reference ships them): what a reference checkpoint was built with unless its flags say
# otherwise. They differ from UNetConfig's own defaults, which are improved-diffusion's.
# class_cond, use_checkpoint and use_fp16 are accepted and have no effect here.
UNET_FLAG_DEFAULTS = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype (stable under bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            # The CPU kernel takes bf16 with float parameters and accumulates in float: the
            # same sums without two full-size casts, which cost a fifth of a demo-model
            # sampling step (measured). Training and GPUs keep the explicit float path.
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return GroupNorm32(groups, channels)


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbeddedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            _norm(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over all positions of a feature map."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool,
                 norm_groups: int = 32):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.new_order = new_order
        self.norm = _norm(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        heads, length = self.num_heads, flat.shape[-1]
        ch = c // heads
        if self.new_order:  # q, k, v first, then heads
            q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
        else:  # heads first, then q, k, v inside each head (the reference's "legacy" layout)
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        # Same maths as softmax(q^T k / sqrt(ch)) v, through the fused kernel.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
        h = self.proj_out(out.reshape(b, c, length))
        return (flat + h).reshape(b, c, *spatial)


class UNet(nn.Module):
    """improved-diffusion UNet. Input: the conditioning images then the noisy mask."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.num_channels
        emb_dim = 4 * ch0
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        attention_ds = cfg.attention_ds
        mults = cfg.mults
        widths = {int(m * ch0) for m in mults}
        if cfg.norm_groups < 1 or any(w % cfg.norm_groups for w in widths):
            raise ValueError(f"norm_groups {cfg.norm_groups} must divide every level's width {sorted(widths)}")
        if not 1 <= cfg.mask_channels < cfg.in_channels:
            raise ValueError(f"mask_channels {cfg.mask_channels} must be at least 1 and leave image channels "
                             f"among the {cfg.in_channels} input channels")

        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention(channels: int, heads: int) -> AttentionBlock:
            return AttentionBlock(channels, heads, cfg.num_head_channels, cfg.use_new_attention_order,
                                  cfg.norm_groups)

        def res(c_in: int, c_out: int, **updown) -> ResBlock:
            return ResBlock(c_in, emb_dim, cfg.dropout, c_out, cfg.use_scale_shift_norm, norm_groups=cfg.norm_groups,
                            **updown)

        ch = int(mults[0] * ch0)
        self.input_blocks = nn.ModuleList(
            [EmbeddedSequential(nn.Conv2d(cfg.stem_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * ch0))]
                ch = int(mult * ch0)
                if ds in attention_ds:
                    layers.append(attention(ch, cfg.num_heads))
                self.input_blocks.append(EmbeddedSequential(*layers))
                skip_channels.append(ch)
            if level != len(mults) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(EmbeddedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbeddedSequential(res(ch, ch), attention(ch, cfg.num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(ch0 * mult))]
                ch = int(ch0 * mult)
                if ds in attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(EmbeddedSequential(*layers))

        self.out = nn.Sequential(
            _norm(ch, cfg.norm_groups), nn.SiLU(), _zeroed(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    # -- forward paths -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                hints: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W), images then noisy mask; t: (B,) integer timesteps;
        x0_prev: (B, mask_channels, H, W) the previous x0 estimate of a self-conditioned model (None:
        zeros); hints: (B, hint_channels, H, W) the user's marks (None: none)."""
        if self.config.self_condition:
            k = self.config.mask_channels
            x = torch.cat([x, torch.zeros_like(x[:, :k]) if x0_prev is None else x0_prev.to(x.dtype)], dim=1)
        if self.config.hint_channels:
            extra = x.new_zeros((x.shape[0], self.config.hint_channels, *x.shape[2:])) if hints is None else hints
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        return self._body(self.input_blocks[0](x, None), t)

    @property
    def _stem(self) -> nn.Conv2d:
        return self.input_blocks[0][0]

    def encode_condition(self, images: torch.Tensor, hints: torch.Tensor | None = None) -> torch.Tensor:
        """First-layer features of the conditioning images (bias included) and of the marks.

        The stem is linear, so conv(cat(images, mask)) = conv_images(images) + conv_mask(mask).
        The image half is the same for every step and every chain: computing it once saves
        a concatenation and most of the stem per step, and lets N chains share one copy. The
        marks, like the images, are the slice's, so they join it here.
        """
        stem = self._stem
        n = self.config.cond_channels
        features = F.conv2d(images, stem.weight[:, :n], stem.bias, padding=1)
        if self.config.hint_channels and hints is not None:  # zeros add nothing
            k = self.config.hint_channels
            features = features + F.conv2d(hints.to(images.dtype), stem.weight[:, -k:], None, padding=1)
        return features

    def forward_conditioned(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, x0_prev: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t: (S*N, K, H, W) noisy masks (K = mask_channels) of N chains for each of S images;
        condition: (S, C, H, W) from :meth:`encode_condition`; x0_prev: (S*N, K, H, W) the
        chains' previous x0 estimates (self-conditioned models; None: zeros). Same result as
        :meth:`forward`."""
        stem = self._stem
        n, k = self.config.cond_channels, self.config.mask_channels
        h = F.conv2d(x_t, stem.weight[:, n : n + k], None, padding=1)
        if self.config.self_condition and x0_prev is not None:  # zeros add nothing
            h = h + F.conv2d(x0_prev.to(x_t.dtype), stem.weight[:, n + k : n + 2 * k], None, padding=1)
        s = condition.shape[0]
        h = (h.unflatten(0, (s, -1)) + condition[:, None]).flatten(0, 1)
        return self._body(h, t)

    def compile_body(self, mode: str = "default") -> None:
        """Run everything after the stem under ``torch.compile`` (both forward paths use it).

        The first call per input shape compiles (about a minute for the paper config);
        "reduce-overhead" also replays CUDA graphs, which pays on a GPU, where launching the
        network's hundreds of small kernels one by one costs more than running them."""
        self._body = torch.compile(self._body, mode=mode)  # instance attribute: state_dict unchanged

    def _body(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.num_channels)).type(h.dtype)
        skips = [h]
        for block in self.input_blocks[1:]:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
