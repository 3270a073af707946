"""The napari side of napari-diffseg: the dock widget and the logic it runs on."""
