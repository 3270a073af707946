"""The napari side of napari-diffseg: the "Diffusion segmentation" dock widget and what it runs on.

Without Qt (plain Python, numpy; napari's layer classes only where a layer is made or typed):
    inputs          which layers are a run's inputs, and whether they can be
    models          the loaded models, kept between runs
    job             the request of a run, the job in the worker thread, its outcome, its error text
    results         a case's result, the user's hand edits, the cases of this widget
    figures         Dice/HD95 for the review, and how they read
    settings        the settings dataclass and its file
    style           colours and colormaps of our layers
    result_layers   our layers of a case in the viewer, found by metadata
    preview         the live preview layer of a run

With Qt:
    workers         worker threads that never outlive napari
    run             the Run panel and the run it starts (progress, ends)
    form            the input, model and sampling groups; settings shown in controls by name
    refine_tools    the scribble and region layers, a Refine's request
    review          Accept, threshold, members, figures, ranking
    layout          three columns of groups that scroll
    tooltips, keys  texts and shortcuts
    widget          DiffSegWidget: the parts laid out and wired

The Qt-free core of the package (napari_diffseg.refine and the rest) imports nothing from here.
"""
