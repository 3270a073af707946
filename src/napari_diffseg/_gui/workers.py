"""Worker threads that never outlive napari (issue 24).

Qt's thread pool outlives Python's objects: a worker still inside a step (or an HD95) when the
interpreter shuts down emits into deleted signals, and PyQt aborts the process (napari closed a
second after Cancel). So every worker the widget starts is tracked here: its slots are cut and
the worker told to stop when the widget's window closes or the widget goes away, and at exit the
ones still running are waited for.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject, QThreadPool

log = logging.getLogger(__name__)

_LIVE_WORKERS: set = set()  # our workers that may still be running, in every widget
EXIT_WAIT_S = 120  # at most this long for the step in progress at exit (a paper-config step on a CPU: seconds)


def _track(worker) -> None:
    _LIVE_WORKERS.add(worker)
    worker.finished.connect(lambda w=worker: _LIVE_WORKERS.discard(w))


@atexit.register
def _await_workers_at_exit() -> None:
    running = [worker for worker in _LIVE_WORKERS if worker.is_running]
    if not running:
        return
    log.info("napari-diffseg: waiting for %d worker(s) to finish their step before exit", len(running))
    for worker in running:
        worker.quit()
    QThreadPool.globalInstance().waitForDone(EXIT_WAIT_S * 1000)


def release(links: dict) -> None:
    """Stop the workers and cut their signals from the widget (it, or its viewer, is going away);
    the threads end by themselves at their next step (and are waited for at exit)."""
    for worker in links.pop("workers", ()):
        worker.quit()
    for _worker, signal, slot in links.pop("slots", ()):
        try:
            signal.disconnect(slot)
        except (TypeError, RuntimeError):  # already cut, or the signals object is gone
            pass


class WorkerLinks(QObject):
    """The running workers of one widget and its slots on their signals.

    ``links`` is a plain dict, so that the widget's destroyed signal can still release them when
    the widget itself cannot be reached any more. The top-level window the widget sits in
    (napari's main window once docked) is watched: when it closes, ``on_close`` is called.
    """

    def __init__(self, widget, on_close: Callable[[], None]):
        super().__init__(widget)
        self.links: dict = {}
        self.closed = False
        self._on_close = on_close
        self._watched = None

    def connect(self, worker, **slots) -> None:
        """Connect slots to a worker's signals, remembered so that closing can cut them."""
        self._watch_window()
        _track(worker)
        for name, slot in slots.items():
            signal = getattr(worker, name)
            signal.connect(slot)
            self.links.setdefault("slots", []).append((worker, signal, slot))
        self.links.setdefault("workers", []).append(worker)

    def forget(self, worker) -> None:
        """A worker has ended: drop its links."""
        self.links["workers"] = [w for w in self.links.get("workers", []) if w is not worker]
        self.links["slots"] = [link for link in self.links.get("slots", []) if link[0] is not worker]

    def release(self) -> None:
        """Stop every worker and cut every slot: nothing reaches the widget any more."""
        self.closed = True
        release(self.links)

    def _watch_window(self) -> None:
        widget = self.parent()
        window = widget.window()
        watched = self._watched() if self._watched is not None else None
        if window is widget or window is watched:
            return
        if watched is not None:
            try:
                watched.removeEventFilter(self)
            except RuntimeError:  # deleted meanwhile
                pass
        window.installEventFilter(self)
        self._watched = weakref.ref(window)  # weak: the closed window must not outlive napari's hold on it

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        # A close napari did not get from the window system has no dialog that could cancel it
        # (viewer.close(), File > Close Window); the user's click on the window's X may still be
        # cancelled in a dialog, and is acted on when the window is then deleted.
        if self._watched is not None and watched is self._watched() and not self.closed and (
                (event.type() == QEvent.Type.Close and not event.spontaneous())
                or event.type() == QEvent.Type.DeferredDelete):
            self._on_close()
        return False
