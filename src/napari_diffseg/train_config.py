"""What ``diffseg-train`` is told: its flags (the reference's and ours) and the typed
configuration built from them once, which the trainer reads instead of the argparse namespace.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from .checkpoint import check_unsupported_flags
from .cli import add_model_flags, make_parser, model_flags_from_args, positive_int
from .errors import DiffSegError
from .preprocess import INPUT_NORMS
from .regions import REGION_SETS


# -- the command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "diffseg-train",
        "Train the conditional diffusion segmentation model (Wolleb et al.) on "
        "slice folders or BraTS case folders. Flags as in the reference implementation.",
    )
    parser.add_argument("--data_dir", required=True, help="training cases (slice folders or BraTS volumes)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (the peak, with a schedule)")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="slices per optimizer step, per process")
    parser.add_argument("--ema_rate", type=float, default=0.9999, help="EMA rate of the weights kept for sampling")
    add_model_flags(parser)
    extra = parser.add_argument_group("napari-diffseg")
    extra.add_argument("--out_dir", default="results", help="checkpoints, model.pt and progress.csv go here")
    extra.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: run until interrupted, as the reference)")
    extra.add_argument("--max_minutes", type=float, default=0, help="stop (and save) after this much training wall time, counted over "
                       "the whole run: a --resume continues the count (0: no limit)")
    extra.add_argument("--save_interval", type=positive_int, default=5000, help="optimizer steps between checkpoint saves")
    extra.add_argument("--log_interval", type=positive_int, default=100, help="rows in progress.csv (mean over the interval)")
    extra.add_argument("--resume", default="", help="a checkpoint.pt (or the out dir holding one) to continue from")
    extra.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    extra.add_argument("--seed", type=int, default=0, help="random seed of the weights, batches and noise")
    extra.add_argument("--val_dir", default="", help="labelled cases for a validation loss at every save")
    extra.add_argument("--crop_border", type=int, default=8, help="pixels cropped from each edge (the reference: 8, 240 -> 224)")
    extra.add_argument("--resize_to", type=int, default=0, help="train at this square size (0: native size); stored in the model")
    extra.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype (fp16 on CUDA only)")
    extra.add_argument("--channels_last", action="store_true", help="channels-last memory layout (faster with bf16)")
    extra.add_argument("--augment", action="store_true", help="random left-right flips")
    extra.add_argument("--augment_intensity", action="store_true",
                       help="a random gamma (0.7-1.4) and gain (0.9-1.1) per slice and modality, as scanners differ")
    extra.add_argument("--augment_spatial", action="store_true",
                       help="a random rotation (up to 15 degrees) and zoom (0.9-1.1) per slice, images and mask alike")
    extra.add_argument("--augment_strong", action="store_true",
                       help="nnU-Net-style, each on 10-25%% of the slices: an elastic deformation (images and mask "
                       "alike), then Gaussian noise, blur, brightness, contrast and a simulated low resolution "
                       "inside the brain, per modality")
    extra.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    extra.add_argument("--sample_respacing", default="", help="default sampling steps stored in model.pt (e.g. 50)")
    extra.add_argument("--cleanup_min_voxels", type=int, default=0, metavar="VOXELS",
                       help="the 3D clean-up size stored in model.pt (decide it by cross-validation: "
                       "scripts/crossval_cleanup.py); diffseg-sample and the widget then remove islands of a "
                       "whole-volume mask below it (0: none stored, no clean-up)")
    extra.add_argument("--flip_members", action="store_true",
                       help="store test-time flips as the model's sampling default: every second member "
                       "segments the left-right mirrored slice (the U-Net baseline averages both passes)")
    extra.add_argument("--no_progress", action="store_true", help="no progress bar")
    extra.add_argument("--norm_groups", type=positive_int, default=32,
                       help="GroupNorm groups (the reference: 32). At num_channels 32 that is one channel per "
                       "group, which hides a uniform offset of the noisy mask from the network; 8 keeps it visible")
    extra.add_argument("--input_norm", default="percentile", choices=list(INPUT_NORMS),
                       help="what the model sees of each modality: the per-volume [0, 1] percentile scaling, or "
                       "that z-scored over the volume's brain (stored in the model; sampling follows it)")
    extra.add_argument("--context", type=int, default=0,
                       help="neighbouring slices on either side fed as extra condition channels (2.5D; stored "
                       "in the model; a lone 2D slice repeats itself)")
    extra.add_argument("--objective", default="diffusion", choices=["diffusion", "segmentation"],
                       help="diffusion (the method) or segmentation (deterministic U-Net baseline, Dice + BCE)")
    extra.add_argument("--regions", default="wt", choices=list(REGION_SETS),
                       help="what the mask holds: wt (whole tumour, BraTS labels 1, 2, 4 as one mask) or brats "
                       "(three nested masks at once: WT = 1, 2, 4; TC = 1, 4; ET = 4; the losses averaged over "
                       "them). Stored in the model; sampling writes a label map and maps per region")
    recipe = parser.add_argument_group("training recipe (defaults: the reference's behaviour)")
    recipe.add_argument("--tumour_fraction", type=fraction, default=0.0,
                        help="share of each batch drawn from slices that hold tumour; the rest uniformly "
                        "from all brain slices (0: all uniform, as the reference)")
    recipe.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"],
                        help="constant (the reference) or cosine decay to zero at the end of the run "
                        "(--max_steps, or the elapsed share of --max_minutes, whichever is further)")
    recipe.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up over this many steps")
    recipe.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    recipe.add_argument("--x0_loss_weight", type=float, default=0.0,
                        help="add this weight x (soft Dice + BCE) of the model's x0 estimate to the diffusion loss")
    recipe.add_argument("--self_condition", action="store_true",
                        help="the network also sees the previous step's x0 estimate (an extra input channel; zeros "
                        "at the first step; half the training steps see a detached estimate); stored in the model")
    recipe.add_argument("--click_fraction", type=fraction, default=0.0,
                        help="share of training slices that come with simulated user marks: one at the centre of "
                        "the largest error of the model's own estimate, up to two more that agree with the truth. "
                        "The model gets two input channels for marks (tumour, not tumour), stored in it, and a "
                        "refine then feeds it the user's scribbles (0: no mark channels, as the reference)")
    recipe.add_argument("--init_from", default="",
                        help="start from the weights of this trained model (its model.pt or checkpoint.pt, the EMA "
                        "weights) instead of random ones; the model flags must match, except that input channels "
                        "it lacks (e.g. the marks of --click_fraction) start at zero, so the network starts out "
                        "computing what that model did. A fresh optimizer and schedule")
    return parser


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {number}")
    return number


@dataclass(frozen=True)
class TrainConfig:
    """diffseg-train's settings, typed and checked once (:meth:`from_args`); the flags of the same
    names say what each means."""

    data_dir: str
    val_dir: str
    out_dir: str
    resume: str
    init_from: str
    objective: str  # "diffusion" (the method) or "segmentation" (the one-pass baseline)
    regions: str  # "wt" (one whole-tumour mask) or "brats" (WT, TC, ET: regions.py)
    model_flags: dict  # the reference's model and diffusion flags
    # the network and what it sees
    norm_groups: int
    input_norm: str
    context: int
    self_condition: bool
    click_fraction: float
    crop_border: int
    resize_to: int
    sample_respacing: str
    cleanup_min_voxels: int
    flip_members: bool
    # optimisation
    lr: float
    weight_decay: float
    batch_size: int
    ema_rate: float
    lr_schedule: str
    warmup_steps: int
    grad_clip: float
    x0_loss_weight: float
    tumour_fraction: float
    augment: bool
    augment_intensity: bool
    augment_spatial: bool
    augment_strong: bool
    # the run
    max_steps: int
    max_minutes: float
    save_interval: int
    log_interval: int
    seed: int
    device: str
    precision: str
    channels_last: bool
    threads: int
    no_progress: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "model_flags"}
        return cls(**values, model_flags=model_flags_from_args(args))

    def __post_init__(self):
        for name in ("lr", "threads", "max_steps", "max_minutes", "crop_border", "resize_to", "warmup_steps",
                     "context", "cleanup_min_voxels"):
            value = getattr(self, name)
            if value < 0:
                raise DiffSegError(f"--{name} {value}: give a number of at least 0")
        check_unsupported_flags(self.model_flags)
        if self.segmentation:
            for name in ("self_condition", "click_fraction"):
                if getattr(self, name):
                    raise DiffSegError(f"--{name} is for the diffusion objective; leave it out with "
                                       "--objective segmentation")
        if self.regions != "wt" and self.click_fraction:
            # The simulated marks (and the widget's scribbles) say tumour or not: one mask's language.
            raise DiffSegError(f"--click_fraction is for whole-tumour models; leave it out with --regions "
                               f"{self.regions}")
        if self.lr_schedule == "cosine" and not (self.max_steps or self.max_minutes):
            raise DiffSegError("--lr_schedule cosine decays to zero at the end of the run: give --max_steps or "
                               "--max_minutes")

    @property
    def segmentation(self) -> bool:
        return self.objective == "segmentation"

    def to_dict(self) -> dict:
        """The settings as the flags hold them (stored in the checkpoint as ``train_args``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_flags"}
        return {**values, **self.model_flags}
