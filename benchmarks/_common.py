"""What the two benchmark scripts share: configs, devices, clocks, memory and result output.

The benchmarks are plain scripts (``python benchmarks/bench_sampler.py``); this module sits
beside them so both import it the same way, from the command line and from the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.errors import DiffSegError
from napari_diffseg.batching import cpu_name
from napari_diffseg.inference import resolve_device, resolve_precision
from napari_diffseg.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
TIMINGS_JSON = REPO.parent / "shared" / "reference" / "timings.json"

# The reference's PAPER flags (its README: 128 channels, 2 res blocks; the rest its defaults).
# Used when ../shared/reference/timings.json is not there to read them from.
PAPER_FLAGS = {
    "image_size": 256, "num_channels": 128, "num_res_blocks": 2, "num_heads": 1, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16", "channel_mult": "", "dropout": 0.0,
    "use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
    "learn_sigma": True, "diffusion_steps": 1000, "noise_schedule": "linear",
    "rescale_learned_sigmas": False, "rescale_timesteps": False,
}
PAPER_INPUT = 224  # the reference crops 240 -> 224 and its sampler is hard-wired to that size
PAPER_BATCH = 10  # the authors' training batch size for BraTS (DESIGN.md)

# --quick: a network small enough that a few steps take milliseconds; channel_mult 1,2 with
# attention at image_size/16 = 2 still runs every block type (res, down, up, attention).
TINY_FLAGS = {**PAPER_FLAGS, "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2"}
TINY_INPUT = 32


def paper_flags() -> dict:
    """The PAPER flags as the reference run recorded them, or the built-in copy."""
    try:
        recorded = json.loads(TIMINGS_JSON.read_text())["paper"]["flags"]
    except (OSError, KeyError, ValueError):
        return dict(PAPER_FLAGS)
    return {**PAPER_FLAGS, **recorded}


def reference_timings() -> dict | None:
    try:
        return json.loads(TIMINGS_JSON.read_text())
    except (OSError, ValueError):
        return None


def random_model(flags: dict, seed: int = 0) -> UNet:
    """A UNet with PyTorch's default initialisation everywhere.

    The reference zero-initialises the last conv of every block and the output layer, so an
    untrained network outputs exactly 0. Those layers get random values too: the timing is the
    same, and comparisons between samplers are not trivially equal."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig.from_flags(flags))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and not module.weight.any():
                module.reset_parameters()
        # Keep the output O(0.1): a large learned-variance value v would blow the variance up.
        model.out[-1].weight.mul_(0.1)
    return model.eval()


def diffusion_config(flags: dict) -> DiffusionConfig:
    return DiffusionConfig.from_flags(flags)


# -- devices and clocks ---------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    try:
        device = resolve_device(name)
    except DiffSegError as exc:
        raise SystemExit(f"error: {exc}") from None
    if device.type == "mps":
        device = torch.device("cpu")  # not measured here: timings and memory need cpu or cuda
    return device


def set_threads(threads: int) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as description, and the shared flags."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_flags(parser)
    return parser


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks and 32x32 inputs: checks the script in seconds")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the results here")


def start(args: argparse.Namespace, title: str) -> tuple[torch.device, dict]:
    """Threads and device from the shared flags; prints the header line; returns (device, machine)."""
    if args.threads is None:
        # Tiny networks gain nothing from more threads, and on a busy machine OpenMP threads
        # waiting for each other at every op make them many times slower.
        args.threads = 1 if args.quick else 0
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    info = machine()
    print(f"napari-diffseg {title} benchmark: {info['cpu']}" + (f", {info['gpu']}" if device.type == "cuda" else "")
          + f", device {device}, {threads} threads, torch {torch.__version__}"
          + (", --quick (tiny stand-in networks)" if args.quick else ""))
    return device, info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_precisions(device: torch.device) -> list[str]:
    """Precisions for the fast modes: the first is the headline one, the rest are also timed.

    The headline one is what precision "auto" picks (inference.resolve_precision). Besides it:
    bf16 on a CUDA GPU that has it, and on a CPU without native bf16 oneDNN's emulated bf16,
    to show what it would cost."""
    headline = resolve_precision("auto", device)
    if device.type == "cuda":
        others = ["bf16"] if torch.cuda.is_bf16_supported() else []
    elif headline == "fp32":
        try:
            others = ["bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []
        except (AttributeError, RuntimeError):
            others = []
    else:
        others = []
    return [headline, *(p for p in others if p != headline)]


def train_precision(device: torch.device) -> str:
    """Training's reduced precision: bf16 on CUDA where the GPU has it (fp16 training needs loss
    scaling), else the sampling rule."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return fast_precisions(device)[0]


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- memory ---------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc only), so that the RSS growth
    of the next measurement is not hidden by reuse of the earlier work's free pages."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory growth over a block: CUDA max_memory_allocated, or on the CPU the process
    RSS polled every few milliseconds by a thread (torch's own allocations are invisible to
    tracemalloc). ``mib`` is None where nothing can be measured."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.mib: float | None = None
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "RSS growth (polled)"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        rss = _rss_bytes()
        self._peak = max(self._peak, rss or 0)
        self.mib = (self._peak - self._start) / 2**20


# -- output -----------------------------------------------------------------------------------------
@dataclass
class Timer:
    """Wall time of a block, with the device synchronised at both ends."""

    device: torch.device
    seconds: float = 0.0

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    # Text columns (the first two when the second is long) left-aligned, numbers right-aligned.
    left = {0} | ({1} if len(header) > 2 and any(len(str(r[1])) > 12 for r in rows) else set())
    lines = ["  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(results: dict, path: str | None) -> str:
    """The results as one JSON line; also written to ``path`` when given."""
    line = json.dumps(results, sort_keys=False, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return line


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
