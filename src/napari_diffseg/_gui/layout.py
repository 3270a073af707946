"""Three columns of groups that scroll: stacked in a narrow (left/right) dock, side by side in a
wide one (bottom/top, or a wide floating window), where a single column would leave the canvas
a strip. One column is about 1000 px tall, more than a laptop screen: without the scroll area
napari would grow its window past the screen to fit it."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSize
from qtpy.QtWidgets import QBoxLayout, QFrame, QGroupBox, QScrollArea, QVBoxLayout, QWidget

# From this width on the groups sit side by side; more than the three columns need at their narrowest.
WIDE_LAYOUT_MIN_WIDTH = 960


class ColumnsWidget(QWidget):
    def __init__(self, parent: QWidget | None = None, columns: int = 3):
        super().__init__(parent)
        self._content = QWidget()
        self._root = QBoxLayout(QBoxLayout.Direction.TopToBottom, self._content)
        self._root.setContentsMargins(4, 4, 4, 4)
        self._scroll = QScrollArea()
        self._scroll.setWidgetResizable(True)
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setWidget(self._content)
        # The scroll area keeps the content's size changes to itself: a group that widens after a
        # run (a longer status, a figure) would leave the dock a few pixels short, and it scrolls sideways.
        self._content.installEventFilter(self)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._scroll)
        self.columns: list[QVBoxLayout] = []
        for _ in range(columns):
            column = QWidget()
            column_layout = QVBoxLayout(column)
            column_layout.setContentsMargins(0, 0, 0, 0)
            self._root.addWidget(column)
            self.columns.append(column_layout)

    def add_group(self, column: int, title: str, *inner: QWidget) -> QGroupBox:
        box = QGroupBox(title)
        box_layout = QVBoxLayout(box)
        box_layout.setContentsMargins(2, 2, 2, 2)
        for widget in inner:
            box_layout.addWidget(widget)
        self.columns[column].addWidget(box)
        return box

    def finish_columns(self) -> None:
        """After the last group: side by side, each column's groups sit at the top."""
        for column in self.columns:
            column.addStretch(1)
        self._root.addStretch(1)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        wide = event.size().width() >= WIDE_LAYOUT_MIN_WIDTH
        direction = QBoxLayout.Direction.LeftToRight if wide else QBoxLayout.Direction.TopToBottom
        if self._root.direction() != direction:
            self._root.setDirection(direction)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if watched is self._content and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the dock asks minimumSizeHint again
        return super().eventFilter(watched, event)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        # Never narrower than the groups with the scroll bar beside them: a dock then scrolls up
        # and down only. napari's style sheet widens the groups once docked, so asked each time.
        hint = super().minimumSizeHint()
        width = (self._content.minimumSizeHint().width() + self._scroll.verticalScrollBar().sizeHint().width()
                 + 2 * self._scroll.frameWidth())
        return QSize(max(hint.width(), width), hint.height())

    @property
    def is_wide_layout(self) -> bool:
        return self._root.direction() == QBoxLayout.Direction.LeftToRight
