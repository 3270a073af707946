"""The npe2 manifest: valid, importable, and contributing what napari needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from npe2 import PluginManifest


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_distribution("napari-diffseg")


def test_manifest_validates_with_imports(manifest):
    manifest.validate_imports()  # every python_name resolves to a callable
    assert manifest.name == "napari-diffseg"


def test_npe2_command_line_validation():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent)) or shutil.which("npe2")
    if npe2 is None:
        pytest.skip("the npe2 command is not installed")
    done = subprocess.run([npe2, "validate", "napari-diffseg", "--imports"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_contributions(manifest):
    contributions = manifest.contributions
    reader = contributions.readers[0]
    assert reader.accepts_directories
    assert set(reader.filename_patterns) == {"*.nii", "*.nii.gz"}
    writers = {writer.layer_types[0]: writer for writer in contributions.writers}
    assert set(writers) == {"labels", "image"}
    assert all(".nii.gz" in writer.filename_extensions for writer in writers.values())
    assert {sample.key for sample in contributions.sample_data} == {"brats_slice", "brats_volume", "phantom"}
    assert [widget.display_name for widget in contributions.widgets] == ["Diffusion segmentation"]


def test_manifest_is_package_data():
    import napari_diffseg

    package = Path(napari_diffseg.__file__).parent
    assert (package / "napari.yaml").is_file()
    assert (package / "sample_data" / "README.md").is_file()
    total = sum(path.stat().st_size for path in (package / "sample_data").iterdir())
    assert total < 3.5e6  # the sample data stays small
