"""How many chains go through the network together: timed, kept as a hint, re-checked.

Batching is not free on a CPU: for the paper config at 224x224 five chains cost more together
than one by one (7.1 s against 5.5 s, issue 14), while the 128x128 demo model is several times
faster per chain at 30 chains a call than at one. So a short probe times one network call at
1, N, 2N ... chains. Timings on a busy machine swing by a factor of two within seconds (issue
24: a probe run once under load stored "1 chain per call" and made every later volume 10x
slower), hence:

* every size is timed in interleaved rounds and its best time counts (load only adds time);
* the larger batch wins unless a smaller one is clearly cheaper per chain (a batch too large
  costs a few per cent, one too small can cost a factor of ten);
* the choice is stored only when repeated timings agree; otherwise it serves this run only;
* one stored entry per machine, model, network input size and precision (``batching.json`` in
  :func:`napari_diffseg.config.config_dir`), with its timings, so that a later run can tell
  when it no longer holds;
* every volume times its own first steps (:class:`PaceTuner`): far from the entry's pace, the
  probe runs again; then the next larger batch is tried on the volume itself and kept unless
  clearly slower. A bare network call, which the probe times, misjudges sampling chain by
  chain (the demo model's steps took twice the probe's time per chain at 1 chain per call,
  1.05x at 30), so the volume's own pace has the last word.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import config_dir
from .ensemble import autocast_context
from .errors import DiffSegError
from .files import write_json_atomically

log = logging.getLogger(__name__)

FILE_NAME = "batching.json"
MARGIN = 1.10  # a smaller batch must be this much cheaper per chain to beat a larger one
AGREE = 1.20  # a size's two best timings agree when within this ratio
DEAR = 1.5  # a size this much dearer per chain than the best, twice, is not timed again (nor larger ones)
ROUNDS = 4  # timing rounds at most; still disagreeing after them, the choice is not stored
CHEAP_CALL_S = 0.2  # calls shorter than this are timed as the best of three
RECHECK = 1.5  # a volume's first steps this much faster or slower per chain than expected re-probe
SAMPLING_OVERHEAD = 1.5  # a sampling step per chain against the probe's bare call (1.4 measured, demo model)
CHECK_STEPS = 3  # warm steps a volume's pace is measured over (or 3 batches)


def most_chains(device: torch.device, net_height: int, net_width: int) -> int:
    """The largest network batch worth trying: memory grows with it, gains flatten out."""
    # 64 chains of 224^2 on a GPU; on a CPU 32 of 128^2 (about 10 of 224^2).
    pixels = (64 * 224 * 224) if device.type == "cuda" else (32 * 128 * 128)
    return max(1, pixels // max(1, net_height * net_width))


def batch_candidates(num_ensemble: int, num_slices: int, most: int) -> list[int]:
    """Chains per network call worth timing: 1 (chain by chain), one slice's N chains, and whole
    multiples of slices up to ``most`` (never fewer than one slice's worth)."""
    top = num_ensemble * max(1, min(num_slices, most // num_ensemble))
    return sorted({1, top, *[num_ensemble * 2**k for k in range(16) if num_ensemble * 2**k <= top]})


def pick_chains(ms_per_chain: dict[int, float]) -> int:
    """The largest size whose cost per chain is within :data:`MARGIN` of the cheapest."""
    best = min(ms_per_chain.values())
    return max(size for size, ms in ms_per_chain.items() if ms <= MARGIN * best)


@dataclass
class BatchingChoice:
    """Chains per network call, where the number came from, and the timings behind it."""

    chains: int
    source: str  # "fixed" (given), "compiled", "probed", "stored" (an earlier run's), "re-probed"
    ms_per_chain: dict[int, float] = field(default_factory=dict)  # best time of a call / its chains
    capped: bool = False  # the probe stopped growing: sizes above the largest timed are dearer
    settled: bool = True  # the repeated timings agreed (only then is the choice stored)
    pace_ms: dict[int, float] = field(default_factory=dict)  # ms per chain and step a volume took, by size

    @property
    def expected_ms(self) -> float | None:
        """Milliseconds per chain the chosen size took in the probe."""
        return self.ms_per_chain.get(self.chains)

    def covers(self, sizes: list[int]) -> bool:
        """Whether the timings answer for these candidate sizes."""
        if not self.ms_per_chain:
            return False
        top = max(self.ms_per_chain)
        return all(s in self.ms_per_chain or (self.capped and s > top) for s in sizes)

    def restricted(self, sizes: list[int], source: str | None = None) -> "BatchingChoice":
        """The choice among ``sizes`` only (a slice run asks for fewer sizes than a volume): the
        chosen size where it is one of them (it may have been tuned on a volume), else the pick
        of the probe's timings. The timings are shared, not copied."""
        timed = {s: ms for s, ms in self.ms_per_chain.items() if s in sizes}
        chains = self.chains if self.chains in sizes else pick_chains(timed)
        return BatchingChoice(chains, source or self.source, self.ms_per_chain, self.capped, self.settled,
                              self.pace_ms)

    def describe(self) -> str:
        return describe_batching(self.chains, self.source, self.settled)

    def to_json(self) -> dict:
        return {"chains": self.chains, "ms_per_chain": {str(k): round(v, 3) for k, v in self.ms_per_chain.items()},
                "capped": self.capped, "pace_ms": {str(k): round(v, 3) for k, v in self.pace_ms.items()},
                "stored_at": time.strftime("%Y-%m-%d %H:%M:%S")}

    @classmethod
    def from_json(cls, value) -> "BatchingChoice | None":
        """An entry of the file, or None for anything malformed (older files held bare numbers)."""
        try:
            timings = {int(k): float(v) for k, v in value["ms_per_chain"].items()}
            pace = {int(k): float(v) for k, v in (value.get("pace_ms") or {}).items()}
            chains = int(value["chains"])
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        if chains not in timings or any(k < 1 or not v > 0 for k, v in {**timings, **pace}.items()):
            return None
        return cls(chains, "stored", timings, bool(value.get("capped", False)), True, pace)


SOURCE_WORDS = {"fixed": "fixed", "compiled": "compiled model", "probed": "timed now", "stored": "stored",
                "re-probed": "re-timed: the stored choice was off", "tuned": "tuned on a volume", "session": "timed earlier, not stored",
                "trying": "trying a larger batch"}


def describe_batching(chains: int, source: str, settled: bool = True) -> str:
    """For a status line: "30 chains per call (stored)"."""
    words = SOURCE_WORDS.get(source, source)
    if source in ("probed", "re-probed") and not settled:
        words += ", not stored: the timings disagreed"
    return f"{chains} chain{'s' if chains != 1 else ''} per call ({words})"


# -- the file ---------------------------------------------------------------------------------


def batching_file() -> Path:
    return config_dir() / FILE_NAME


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def stored_batching(key: str) -> BatchingChoice | None:
    return BatchingChoice.from_json(_read_table(batching_file()).get(key))


def store_batching(key: str, choice: BatchingChoice) -> None:
    """Atomically put one entry in the file (dropping entries of an older format); a failure
    only costs a probe next time."""
    path = batching_file()
    try:
        table = {k: v for k, v in _read_table(path).items() if BatchingChoice.from_json(v) is not None}
        table[key] = choice.to_json()
        write_json_atomically(path, table)
    except OSError as exc:
        log.warning("could not keep the batching choice in %s (%s)", path, exc)


def drop_batching(key: str) -> None:
    """Remove one stored entry (one a volume's own pace has shown wrong, where the probe timed
    again could not settle on a better one): the next run probes afresh instead of starting
    from the wrong choice again."""
    path = batching_file()
    table = _read_table(path)
    if key not in table:
        return
    del table[key]
    try:
        write_json_atomically(path, table)
    except OSError as exc:
        log.warning("could not drop the batching choice from %s (%s)", path, exc)


def forget_batching() -> bool:
    """Remove every stored choice (the next run of each model probes again); True if there were any."""
    path = batching_file()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DiffSegError(f"could not remove {path} ({exc}); delete it by hand") from exc
    return True


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


# -- the probe --------------------------------------------------------------------------------


def probe_batching(model, device: torch.device, sizes: list[int], size: tuple[int, int], precision: str,
                   channels_last: bool = True, measure: Callable[[int], float] | None = None) -> tuple[int, dict]:
    """Time one network call at each batch size in ``sizes`` (ascending) and return the chosen
    size and a report (``ms_per_chain``, ``settled``, ``capped``, ``rounds``, ``probe_s``).

    Round one grows through the sizes (a warm-up call, then a timed one) and stops growing at
    the first size :data:`DEAR` times the best cost per chain. Later rounds time every size
    again, in alternating order so that a change of load falls on all of them; a size counts
    by its best time. The probe ends when each size's two best times agree and the choice did
    not change, or after :data:`ROUNDS` rounds (``settled`` False). ``measure(batch)`` ->
    seconds of one call replaces the timing (tests)."""
    began = time.perf_counter()
    measure = measure or _call_timer(model, device, size, precision, channels_last)
    times: dict[int, list[float]] = {}  # seconds per chain, every timing of a size

    def time_one(batch: int) -> None:
        seconds = measure(batch)
        if seconds < CHEAP_CALL_S:  # cheap calls are noisy: the best of three
            seconds = min(seconds, measure(batch), measure(batch))
        times.setdefault(batch, []).append(seconds / batch)

    def best() -> dict[int, float]:
        return {b: min(v) for b, v in times.items()}

    def dear(batch: int) -> bool:  # timed twice, and both times DEAR x the best: no more timings needed
        return len(times[batch]) >= 2 and min(times[batch]) > DEAR * min(best().values())

    def grow(pending: list[int]) -> None:
        while pending:
            batch = pending.pop(0)
            measure(batch)  # the first call at a shape allocates and picks kernels (and compiles, if on)
            time_one(batch)
            if times[batch][-1] > DEAR * min(best().values()):
                return  # larger sizes wait until this one is confirmed dear or found a fluke

    pending = list(sizes)
    grow(pending)
    chosen, settled, rounds = pick_chains(best()), False, 1
    while rounds < ROUNDS:
        rounds += 1
        order = sorted(b for b in times if not dear(b))
        for batch in (order if rounds % 2 else order[::-1]):
            time_one(batch)
        if pending and min(times[max(times)]) <= DEAR * min(best().values()):
            grow(pending)  # the size that stopped the growth was a fluke: go on growing
        previous, chosen = chosen, pick_chains(best())
        agree = all(len(v) >= 2 and sorted(v)[1] <= AGREE * min(v) for b, v in times.items() if not dear(b))
        if agree and chosen == previous:
            settled = True
            break
    per_chain = best()
    return chosen, {"network_input": list(size), "precision": precision, "chosen": chosen,
                    "ms_per_chain": {b: round(1000 * v, 2) for b, v in sorted(per_chain.items())},
                    "settled": settled, "capped": bool(pending),
                    "rounds": rounds, "probe_s": round(time.perf_counter() - began, 3)}


def _call_timer(model, device: torch.device, size: tuple[int, int], precision: str,
                channels_last: bool) -> Callable[[int], float]:
    """Seconds of one sampling call of the network (image stem + conditioned body) at a batch."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    inputs: dict[int, tuple] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(batch: int) -> float:
        if batch not in inputs:
            inputs[batch] = (torch.rand((batch, model.config.cond_channels, *size), generator=generator).to(device),
                             torch.randn((batch, model.config.mask_channels, *size), generator=generator).to(device),
                             torch.full((batch,), 500, dtype=torch.long, device=device))
        images, x, t = inputs[batch]
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), autocast_context(device, precision):
            condition = model.encode_condition(images.to(memory_format=layout))
            model.forward_conditioned(x.to(memory_format=layout), t, condition)
        sync()
        return time.perf_counter() - start

    return measure


def needs_recheck(choice: BatchingChoice, measured_ms: float) -> bool:
    """Whether a volume's pace (ms per chain and step) is far from what the choice expects:
    the pace an earlier volume took at this size, else the probe's time per chain. A sampling
    step costs more than the probe's bare network call (the sampler's arithmetic, copies, a
    preview), up to :data:`SAMPLING_OVERHEAD` times, so against the probe only a pace clearly
    faster, or slower beyond that, counts."""
    pace = choice.pace_ms.get(choice.chains)
    if pace is not None:
        return not pace / RECHECK <= measured_ms <= pace * RECHECK
    expected = choice.expected_ms
    return expected is not None and not expected / RECHECK <= measured_ms <= expected * SAMPLING_OVERHEAD * RECHECK


class PaceTuner:
    """Times a volume's sampling at its batching, and tries larger batches on the volume itself.

    The probe times bare network calls; a sampling step costs more, and not by the same factor
    at every size (chain by chain, the demo model's steps took 2x the probe's time per chain,
    30 at a time 1.05x). So the pace that counts is the volume's own: over the first
    :data:`CHECK_STEPS` warm steps (the first step at a size allocates) at the current size,
    then at the next larger candidate, kept when it is not clearly slower per chain
    (:data:`MARGIN`), and so on up. A choice this run did not time itself is first checked
    against its expected pace (:func:`needs_recheck`) and timed again (``reprobe``) when far
    off. ``record(choice)`` keeps what was learned (memory, file). Call :meth:`step` after each
    sampling step with the seconds spent in it, :meth:`batch_done` after each batch.
    """

    def __init__(self, choice: BatchingChoice, sizes: list[int], fresh: bool,
                 reprobe: Callable[[], BatchingChoice], record: Callable[[BatchingChoice], None]):
        self.choice, self.sizes, self.fresh = choice, sizes, fresh
        self.reprobe, self.record = reprobe, record
        self.chains = choice.chains  # what the next batch runs at (the choice, or a size being tried)
        self.phase = "measure" if choice.expected_ms is not None else None
        self._reset()

    def _reset(self) -> None:
        self.seconds, self.chain_steps, self.steps, self.batches, self.skip = 0.0, 0, 0, 0, True

    def describe(self) -> str:
        return describe_batching(self.chains, "trying", True) if self.phase == "explore" else self.choice.describe()

    def step(self, seconds: float, chains: int) -> None:
        """One sampling step of ``chains`` chains took ``seconds`` (the caller's time only)."""
        if self.phase is None:
            return
        if self.skip:  # the first step at a size allocates and picks kernels
            self.skip = False
            return
        self.seconds, self.chain_steps, self.steps = self.seconds + seconds, self.chain_steps + chains, self.steps + 1

    def batch_done(self, last: bool) -> int:
        """A batch ended (``last``: no batch follows): the chains per call of the next one."""
        if self.phase is None:
            return self.chains
        self.batches += 1
        if not self.chain_steps or (max(self.steps, self.batches) < CHECK_STEPS and not last):
            return self.chains
        pace = 1000 * self.seconds / self.chain_steps
        if self.phase == "measure":
            if not self.fresh and not last and needs_recheck(self.choice, pace):
                log.info("batching: %s, expected %.1f ms per chain and step, took %.1f: timing again",
                         self.choice.describe(), self.choice.pace_ms.get(self.chains, self.choice.expected_ms), pace)
                self.choice, self.fresh = self.reprobe(), True
                self.chains = self.choice.chains
                self._reset()
                return self.chains
            self.choice.pace_ms[self.chains] = pace
            self.record(self.choice)
            return self._try_larger(last)
        base = self.choice.chains
        self.choice.pace_ms[self.chains] = pace
        if pace <= MARGIN * self.choice.pace_ms[base]:  # the larger batch wins unless clearly slower
            self.choice.chains, self.choice.source = self.chains, "tuned"
            self.record(self.choice)
            return self._try_larger(last)
        self.record(self.choice)
        self.phase, self.chains = None, base
        return base

    def _try_larger(self, last: bool) -> int:
        larger = [size for size in self.sizes if size > self.chains]
        if last or not larger:
            self.phase = None
            return self.chains
        self.phase, self.chains = "explore", larger[0]
        self._reset()
        return self.chains
