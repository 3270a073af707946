"""How our layers look: their colours and colormaps (napari's colormap classes, no Qt).

napari's default label colours for the BraTS labels 1, 2, 4 are brown, light blue and purple; the
proposal is yellow and the accepted segmentation green, so neither is mistaken for a
ground-truth label (which is drawn as an outline besides). A region model's proposal and
segmentation are BraTS label maps in the colours BraTS figures use: necrotic core red, oedema
green, enhancing tumour yellow.
"""

from __future__ import annotations

from ..refine import SCRIBBLE_BACKGROUND, SCRIBBLE_TUMOUR

PROPOSAL_RGBA = (1.0, 0.85, 0.0, 1.0)
SEGMENTATION_RGBA = (0.2, 0.95, 0.35, 1.0)
OTHER_LABEL_RGBA = (1.0, 0.3, 1.0, 1.0)  # labels other than 1 painted into the segmentation
# Scribbles: red "tumour" and blue "not tumour", unlike every other colour on the canvas (the
# inferno heatmap has no blue; the BraTS truth is an outline); other labels grey (ignored).
SCRIBBLE_RGBA = {SCRIBBLE_TUMOUR: (1.0, 0.12, 0.12, 1.0), SCRIBBLE_BACKGROUND: (0.2, 0.5, 1.0, 1.0)}


def hex_colour(rgba) -> str:
    """The "#rrggbb" of an (r, g, b[, a]) colour in 0..1, for rich text."""
    return "#%02x%02x%02x" % tuple(int(255 * c) for c in rgba[:3])


SCRIBBLE_HEX = {label: hex_colour(rgba) for label, rgba in SCRIBBLE_RGBA.items()}
REGION_RGBA = (1.0, 0.45, 1.0, 1.0)  # magenta outline, faint fill
HINT_RGBA = (1.0, 1.0, 1.0, 1.0)  # white: stands out on the heatmap and the yellow proposal
BRATS_RGBA = {1: (1.0, 0.15, 0.15, 1.0), 2: (0.15, 0.85, 0.25, 1.0), 4: (1.0, 0.9, 0.0, 1.0)}
BRATS_NAMES = {1: "necrotic / non-enhancing core", 2: "oedema", 4: "enhancing tumour"}
# The variance of the mean of {0, 1} members is p(1 - p) <= 1/4: a fixed scale, comparable between runs.
UNCERTAINTY_LIMITS = (0.0, 0.25)


def label_colormap(rgba):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: OTHER_LABEL_RGBA, 0: (0, 0, 0, 0), 1: rgba})


def brats_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: OTHER_LABEL_RGBA, 0: (0, 0, 0, 0), **BRATS_RGBA})


def brats_legend() -> str:
    """The BraTS labels and their colours, as rich text for a label in the widget."""
    return "<br>".join(f'<span style="color:{hex_colour(BRATS_RGBA[label])}">&#9632;</span> {label} {name}'
                       for label, name in BRATS_NAMES.items())


def fading_colormap(name: str, rgb, alpha: float = 0.9):
    """One colour whose opacity grows with the value: 0 is fully transparent (anatomy shows)."""
    from napari.utils.colormaps import Colormap

    return Colormap([[*rgb, 0.0], [*rgb, alpha]], name=name)


def uncertainty_colormap():
    """inferno's colours with an opacity ramp: certain pixels leave the anatomy visible."""
    from napari.utils.colormaps import Colormap

    colors = [[0.0, 0.0, 0.0, 0.0], [0.34, 0.06, 0.43, 0.3], [0.73, 0.21, 0.33, 0.5],
              [0.98, 0.55, 0.04, 0.65], [0.99, 1.0, 0.64, 0.8]]
    return Colormap(colors, controls=[0.0, 0.04, 0.4, 0.75, 1.0], name="diffseg uncertainty")


def scribble_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0.6, 0.6, 0.6, 1.0), 0: (0, 0, 0, 0), **SCRIBBLE_RGBA})
