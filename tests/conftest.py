"""Shared fixtures: where ../shared lives and how its absence is handled, and a private config
folder for every test."""

import os
import tempfile
from pathlib import Path

import pytest

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
