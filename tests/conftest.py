"""Shared fixtures: where ../shared lives and how its absence is handled, a private config
folder for every test, and the widget with a tiny model (the GUI tests)."""

import os
import tempfile
from pathlib import Path

import pytest

from napari_diffseg import synthetic

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Before any test module is imported: an environment copied at import time (a subprocess's
# env=) must not point at the user's own folder either (issue 24: the CLI tests probed and
# stored batching choices in ~/.config/napari-diffseg). Each test then gets a fresh one below.
_SESSION_CONFIG = tempfile.TemporaryDirectory(prefix="napari-diffseg-tests-")
os.environ["NAPARI_DIFFSEG_CONFIG_DIR"] = _SESSION_CONFIG.name


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent (the project's shared data sits beside the checkout in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _private_config_dir(tmp_path_factory, monkeypatch):
    """Settings go to a fresh folder, never the user's own. The chains per network call are
    fixed, so that results compared across runs in a test are not left to a timed probe's
    choice (tests/test_batching.py asks for the probe by name)."""
    monkeypatch.setenv("NAPARI_DIFFSEG_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
    monkeypatch.setenv("NAPARI_DIFFSEG_BATCHING", "8")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _shared_path()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _shared_path("reference", "small")


@pytest.fixture(scope="session")
def seed_data_dir() -> Path:
    return _shared_path("seed-data", "data")


@pytest.fixture(scope="session")
def brats18_dir() -> Path:
    return _shared_path("brats18")


# ---------------------------------------------------------------------------------------------
# The widget (tests/gui_support.py has the helpers)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """One torch thread: the machine is shared, and the tiny models gain nothing from more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread_in_viewer_tests(request):
    """Every test with a viewer runs torch on one thread. Its workers run in Qt's pool threads,
    which outlive the test, and torch fixes a thread's count when that thread first computes:
    a pool thread first used at the default count would later compute with it in a test that
    asked for one thread (other kernel blocking, results off in the last bits; the behaviour
    record saw 1.8e-5 after a region widget test)."""
    if "make_napari_viewer" in request.fixturenames:
        request.getfixturevalue("one_torch_thread")
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from gui_support import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny.pt")


@pytest.fixture
def make_widget(make_napari_viewer, tiny_checkpoint, qtbot):
    """make(shape, show, truth, **settings) -> (viewer, widget): the case of random images in a
    viewer, the widget docked and set to the tiny model."""
    from gui_support import RUN_TIMEOUT_MS, add_layers, case_layers

    from napari_diffseg._gui.widget import DiffSegWidget

    made = []

    def make(shape=(32, 32), show=False, truth=False, **settings):
        viewer = make_napari_viewer(show=show)
        add_layers(viewer, case_layers(shape, truth=truth))
        widget = DiffSegWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Diffusion segmentation")
        values = {"model_path": str(tiny_checkpoint), "steps": "5", "num_ensemble": 3, "keep_members": True,
                  "scope": "volume", "seed": 0}
        widget.configure(persist=False, **{**values, **settings})
        made.append(widget)
        return viewer, widget

    yield make
    for widget in made:  # never leave a worker running into the next test
        if widget.closed:  # closed with its viewer (test_lifecycle.py): nothing of it runs any more
            continue
        if widget.runner.worker is not None:
            widget.cancel()
            qtbot.waitUntil(lambda w=widget: w.runner.worker is None, timeout=RUN_TIMEOUT_MS)
        widget.review.timer.stop()
        qtbot.waitUntil(lambda w=widget: w.review.metrics_worker is None, timeout=RUN_TIMEOUT_MS)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(root, n=3, seed=5, size=64)
    return root


@pytest.fixture()
def fake_timer(monkeypatch):
    """The batching probe's network calls timed from a table (fill it: {batch: seconds}) instead
    of the clock, so that a busy CPU cannot change what the probe decides; the sampling stays real."""
    from support import table_timer

    from napari_diffseg import batching

    table = {}
    monkeypatch.setattr(batching, "_call_timer", lambda *args, **kwargs: table_timer(table))
    return table
