"""The loaded models, kept between runs (no Qt)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path


def _stamp(path: str | None) -> tuple[str, float]:
    if not path:
        return "", 0.0
    resolved = Path(path).expanduser()
    try:
        return str(resolved.resolve()), resolved.stat().st_mtime
    except OSError:
        return str(resolved), 0.0


class ModelCache:
    """Loaded models by (checkpoint, flags file, device), newest kept; loads are thread-safe."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def key(self, model_path: str | None, flags_path: str | None, device: str) -> tuple:
        return (_stamp(model_path), _stamp(flags_path), device)

    def cached(self, model_path: str | None, flags_path: str | None, device: str):
        with self._lock:
            return self._items.get(self.key(model_path, flags_path, device))

    def get(self, model_path: str | None, flags_path: str | None, device: str):
        from ..inference import Segmenter

        key = self.key(model_path, flags_path, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            flags = None
            if flags_path:
                from ..checkpoint import reference_flags

                flags = reference_flags(Path(flags_path).expanduser())
            path = Path(model_path).expanduser() if model_path else None
            segmenter = Segmenter.load(path, device=device, reference_flags=flags)
            self.loads += 1
            self._items[key] = segmenter
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return segmenter

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def forget_batching(self) -> None:
        """The loaded models forget their batching choices (the stored ones: batching.forget_batching)."""
        with self._lock:
            for segmenter in self._items.values():
                segmenter.forget_batching()


MODEL_CACHE = ModelCache()


def demo_model_available(regions: str = "wt") -> bool:
    """Whether the bundled model of ``regions`` ("wt", "brats") is installed."""
    from ..checkpoint import installed_bundled_models

    return regions in installed_bundled_models()


def model_to_load(settings) -> str:
    """The checkpoint a run of ``settings`` loads: the chosen file, else the chosen bundled model's."""
    from ..checkpoint import BUNDLED_MODELS, DEMO_MODEL

    return settings.model_path or str(BUNDLED_MODELS.get(settings.bundled_model, DEMO_MODEL))
