"""What the widget's controls say when the pointer rests on them."""

from __future__ import annotations

from ..refine import SCRIBBLE_BACKGROUND, SCRIBBLE_NAMES, SCRIBBLE_TUMOUR


def modality(name: str) -> str:
    return f"the {name} image (filled automatically from layer names)"


TRUTH = "optional ground truth: Dice and HD95 of the result are shown below"
CHECKPOINT = "a checkpoint (.pt) of napari-diffseg or of the reference code; empty = the bundled model chosen below"
BUNDLED = ("the bundled model that runs when no checkpoint is chosen: the whole tumour, or its parts (whole tumour "
           "WT: BraTS labels 1, 2, 4; tumour core TC: 1, 4; enhancing tumour ET: 4) with an uncertainty map each")
FLAGS = ("the model flags (JSON) of a reference-code checkpoint (savedmodelNNNNNN.pt), "
         "e.g. {\"num_channels\": 128, ...}")

ENSEMBLE = "number of chains: their mean is the mask, their variance the uncertainty"
STEPS = "denoising steps (timestep respacing); type e.g. 75 or ddim50 for others"
ETA = ("DDIM's noise per step: 0 = deterministic (the default), 1 = as much as DDPM's; "
       "for the DDIM sampler only")
PRECISION = ("auto: fp16 on a CUDA GPU, bf16 on a CPU that computes it natively (about 1.7x faster), else fp32; "
             "fp16 needs CUDA")
SEED = "the same seed gives the same ensemble"
SCOPE = "for a 3D volume: only the slice shown, or every slice with brain"
RE_TIME = ("forget the stored batching choices (chains per network call): the next run times 1, N, 2N ... chains "
           "per call again. Worth it after a run that was slow while another program took the CPU")

CANCEL = "stop at the next step; finished slices of a volume are kept"

SCRIBBLE_LEGEND = (f"scribble labels: 1 (red) = {SCRIBBLE_NAMES[SCRIBBLE_TUMOUR]}, "
                   f"2 (blue) = {SCRIBBLE_NAMES[SCRIBBLE_BACKGROUND]}")
SCRIBBLE = f"make or select '<case> scribbles' and paint with label 1; {SCRIBBLE_LEGEND}"
REGION = ("make or select '<case> refine region' and draw a rectangle (or any shape): Refine redoes the accepted "
          "segmentation inside it and keeps it outside; without a region only the scribbles are fixed")
REFINE = ("resample the current slice so that the scribbles (and the accepted segmentation outside the region) "
          "hold exactly; starts from the slice's ensemble noised to half the chain (about half a Run), or runs "
          "the whole chain when the slice has no ensemble yet. Changes the proposal, never the segmentation")

ACCEPT = ("copy the proposal of the current slice (every sampled slice after a whole-volume run) into "
          "'<case> segmentation'; voxels you painted there are kept")
THRESHOLD = "proposal = ensemble mean above this; changes the proposal without sampling again (never the segmentation)"
CLEANUP = ("whole-volume results: remove the parts of the proposal (3D connected components) smaller than the "
           "size the model stores, decided by cross-validation; the largest part always stays. Probability and "
           "uncertainty are left as sampled; diffseg-sample --cleanup does the same")
REGION = ("a region model's result: the region whose uncertainty (ensemble variance) is shown and whose "
          "threshold the slider sets; the proposal is the BraTS label map of all three")
MEMBER = "flip through the individual ensemble members (shown in the members layer)"
RANKING = "sampled slices, most uncertain (mean variance) first; click to go there"
