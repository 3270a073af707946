"""The one exception type for problems a user can cause and fix."""


class DiffSegError(Exception):
    """Bad input: the message names the file, layer or flag and says what to do.

    Command-line tools print it as one line and exit with status 2; the napari widget
    shows it as a notification. Anything else escaping is a bug.
    """
