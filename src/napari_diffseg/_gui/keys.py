"""The widget's keyboard shortcuts in the viewer."""

ACCEPT_KEY = "Shift-C"  # "commit"; free in napari's default shortcuts for every layer type
REFINE_KEY = "Shift-R"  # free too (R alone is the Shapes rectangle tool)
