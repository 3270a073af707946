"""Running the sampling job: one at a time, in a napari ``thread_worker`` generator
(``job.guarded_job``). Every denoising step is yielded to the main thread, which advances the
progress bars and, at most ten times a second, redraws the preview layer; the run's end (a
result, the finished slices of a cancelled volume, or an error) is handed to the widget. Layers
are only ever touched on the main thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from magicgui.widgets import Container, Label, ProgressBar, PushButton
from qtpy.QtCore import Qt

from ..errors import DiffSegError
from . import tooltips
from .job import Partial, RunOutcome, RunRequest, error_message, guarded_job, is_out_of_memory
from .keys import ACCEPT_KEY
from .models import MODEL_CACHE
from .preview import Preview
from .workers import WorkerLinks

log = logging.getLogger(__name__)


def _step_through(job):
    return (yield from job)


def _refined_message(request: RunRequest, outcome: RunOutcome) -> str:
    seg = outcome.segmentation
    scope = "" if outcome.z is None else f" (slice {outcome.z})"
    start = ("from the kept members, " if outcome.start_step is not None
             else "whole chains (no members kept for this slice), ")
    return (f"diffseg: refined{scope or ' the slice'} {start}{seg.num_ensemble} chains x {seg.steps} of "
            f"{outcome.chain_steps} {seg.sampler.upper()} steps, {request.note} held, in "
            f"{outcome.seconds:.1f} s; Accept ({ACCEPT_KEY}) to take it into the segmentation")


def _batching_of(segmentation) -> str:
    settings = segmentation.settings
    if "batching" not in settings:
        return ""
    from ..batching import describe_batching

    return describe_batching(settings["chains_per_call"], settings["batching"], settings.get("batching_settled", True))


def _sampled_message(outcome: RunOutcome, batching: str) -> str:
    seg = outcome.segmentation
    scope = "" if outcome.z is None else f" (slice {outcome.z})"
    flips = ", every second on the mirrored slice" if seg.settings.get("flip_members") and seg.num_ensemble > 1 else ""
    return (f"diffseg: {seg.num_ensemble} chains x {seg.steps} {seg.sampler.upper()} steps{scope}{flips} "
            f"in {outcome.seconds:.1f} s on {outcome.device}" + (f"; {batching}" if batching else ""))


class RunController:
    """The Run panel (Run, Cancel, a progress bar, the status line) and the run it starts.

    ``show_result(request, outcome)`` and ``show_partial(request, partial)`` put an ending run's
    result on screen; ``show_batching(text)`` shows its batching; ``on_busy(running)`` lets the
    widget lock what must wait for the run to end.
    """

    def __init__(self, workers: WorkerLinks, preview: Preview, notify: Callable[[str, str], None],
                 show_result: Callable, show_partial: Callable, show_batching: Callable[[str | None], None],
                 on_busy: Callable[[bool], None]):
        self.cache = MODEL_CACHE
        self.worker = None
        self.request: RunRequest | None = None
        self.partial: Partial | None = None
        self.progress_steps = 0  # progress reports of the current/last run (one per denoising step)
        self.preview = preview
        self._workers = workers
        self._notify = notify
        self._show_result, self._show_partial = show_result, show_partial
        self._show_batching, self._on_busy = show_batching, on_busy
        self._pbar = None

        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False, tooltip=tooltips.CANCEL)
        self.progress_bar = ProgressBar(min=0, max=1, value=0, label="")
        self.progress_bar.native.setFormat("step %v / %m")
        self.status = Label(value="ready")
        self.status.native.setWordWrap(True)
        # Room for a wrapped message: a crowded dock would otherwise squeeze it to one cut line
        # (exactly three line spacings still cut a whole-volume run's three-line message).
        self.status.native.setMinimumHeight(round(3.5 * self.status.native.fontMetrics().lineSpacing()))
        run_row = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        run_row.margins = (0, 0, 0, 0)
        self.box = Container(widgets=[run_row, self.progress_bar, self.status], labels=False)
        self.cancel_button.changed.connect(self.cancel)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, request: RunRequest) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import cancelable_progress

        self.request = request
        self.partial = Partial() if request.z is None and request.inputs.spatial_ndim == 3 else None
        self.progress_steps = 0
        self.preview.start(request)
        self._pbar = cancelable_progress(total=0, desc="diffseg: loading the model")
        self.progress_bar.native.setRange(0, 0)  # busy until the first step
        self.status.value = "loading the model…"
        job = guarded_job(request, self.cache, self.partial)
        worker = create_worker(_step_through, job, _ignore_errors=True)
        # Cancel leaves the job between two steps with its context managers open, torch's autocast
        # and inference mode among them; they are closed in the worker's own thread, where they
        # were opened, before the pool hands that thread the next job (which ran in bf16 else).
        worker.aborted.connect(job.close, Qt.ConnectionType.DirectConnection)
        self._workers.connect(worker, yielded=self._on_progress, returned=self._on_returned,
                              errored=self._on_errored, aborted=self._on_aborted, finished=self._on_finished)
        self.worker = worker
        self._set_busy(True)
        worker.start()

    def _set_busy(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        self._on_busy(running)

    def cancel(self, *_) -> None:
        """Stop at the next denoising step; the finished slices of a volume are kept."""
        if self.worker is not None:
            self.status.value = "cancelling…"
            self.worker.quit()

    def reset_batching(self, *_) -> None:
        """Forget the stored batching choices (the file and the loaded models' memory)."""
        if self.running:
            return
        from ..batching import batching_file, forget_batching

        try:
            forget_batching()
        except DiffSegError as exc:
            self._notify(str(exc), "error")
            return
        self.cache.forget_batching()
        self._show_batching(None)
        self._notify(f"batching choices forgotten ({batching_file()}): the next run times 1, N, 2N ... chains "
                     "per call again")

    def stop(self) -> None:
        """The widget is going away (its workers are released): forget the run, close napari's bar."""
        self.worker = None
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            try:
                pbar.close()
            except Exception:  # napari's progress may be torn down already
                pass

    # -- while it runs ------------------------------------------------------------------------

    def _on_progress(self, progress) -> None:
        if self.worker is None or self.worker.abort_requested:
            return
        self.progress_steps += 1
        total = progress.total * progress.batches
        done = progress.batch * progress.total + progress.step
        self.progress_bar.native.setRange(0, total)
        self.progress_bar.native.setValue(done)
        where = ""
        if progress.slices_total > 1:
            from ..inference import format_eta  # torch is loaded by now: a run is under way

            slices = f"slices {progress.slices_done + len(progress.slices)}/{progress.slices_total}"
            left = format_eta(progress.eta)
            where = f", {slices}" + (f", {left}" if left else "")
        doing = "refining" if self.request is not None and self.request.is_refine else "sampling"
        self.status.value = f"{doing}: step {progress.step}/{progress.total}{where}" + (
            f"; {progress.batching}" if progress.batching else "")
        if progress.batching:
            self._show_batching(progress.batching)
        pbar = self._pbar  # napari's progress may process events: the run can end meanwhile
        if pbar is not None:
            if pbar.total != total:
                pbar.total = total
            pbar.set_description(f"diffseg: step {progress.step}/{progress.total}{where}")
            pbar.update(done - pbar.n)
            if pbar.is_canceled:  # Cancel pressed in napari's activity panel
                self.cancel()
                return
        if progress.preview is not None and self.worker is not None:
            self.preview.update(progress)

    # -- its end ------------------------------------------------------------------------------

    def _on_returned(self, outcome: RunOutcome) -> None:
        self.preview.remove()
        request = self.request
        if not self._shown(self._show_result, request, outcome):
            return
        if request.is_refine:
            self._notify(_refined_message(request, outcome))
            return
        batching = _batching_of(outcome.segmentation)
        if batching:
            self._show_batching(batching)
        self._notify(_sampled_message(outcome, batching))

    def _shown(self, show: Callable, request: RunRequest, result) -> bool:
        """Put a run's result on screen; False, with the user told, where that fails (a bug there
        must not leave the widget stuck)."""
        try:
            show(request, result)
        except Exception as exc:
            log.exception("showing the result failed")
            self._notify(error_message(exc, request), "error")
            return False
        return True

    def _on_errored(self, exc: BaseException) -> None:
        self.preview.remove()
        exc = getattr(exc, "original", exc)
        if is_out_of_memory(exc):
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass
        elif not isinstance(exc, DiffSegError):
            log.error("segmentation failed", exc_info=(type(exc), exc, exc.__traceback__))
        self._notify(error_message(exc, self.request), "error")

    def _on_aborted(self) -> None:
        self.preview.remove()
        partial, request = self.partial, self.request
        if request is not None and request.is_refine:
            self._notify("diffseg: refine cancelled; the proposal and the uncertainty are unchanged")
            return
        if partial is None or not partial.finished:
            self._notify("diffseg: sampling cancelled; no slice had finished, no result layers were made")
            return
        if not self._shown(self._show_partial, request, partial):
            return
        self._notify(f"diffseg: sampling cancelled; the {len(partial.finished)} of {partial.total} slices "
                     "that had finished are shown as a partial proposal")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self.worker is not None:
            self._workers.forget(self.worker)
        self.worker = None
        self._set_busy(False)
        if self.progress_bar.native.maximum() == 0:
            self.progress_bar.native.setRange(0, 1)
