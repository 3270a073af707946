"""The one exception type for problems a user can cause and fix."""


class DiffSegError(Exception):
    """Bad input: the message names the file, layer or setting and says what to do.

    The message speaks the core's words (a setting by its name, never a command-line flag), so
    the widget can show it as it is. ``setting`` names the setting at fault, where one is: the
    command-line tools print its flag in front of the message, exit with status 2; the napari
    widget shows the message as a notification. Anything else escaping is a bug.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting
