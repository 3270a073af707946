"""Shared fixtures: where ../shared lives and how its absence is handled."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent (the project's shared data sits beside the checkout in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


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
