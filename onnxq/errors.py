"""The one exception type users see.

Anything wrong with what the user gave us (a file, calibration data, a recipe, an option) is raised
as `OnnxqError` with a one-line message naming the problem. The CLI prints that line and exits
non-zero; a traceback means a bug in onnxq, never a user mistake.
"""


class OnnxqError(Exception):
    """A problem with the user's input or environment, explained in one line."""
