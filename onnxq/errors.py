"""The exception types users see.

Anything wrong with what the user gave us (a file, calibration data, a recipe, an option) is raised
as `OnnxqError` with a one-line message naming the problem. The CLI prints that line and exits
non-zero; a traceback means a bug in onnxq, never a user mistake.

An argument of `onnxq.quantize` of the wrong type raises `OnnxqTypeError`, one with a value out of
range `OnnxqValueError`: both are OnnxqErrors, and also the TypeError / ValueError Python code
expects, and their message names the argument.
"""


class OnnxqError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class OnnxqTypeError(OnnxqError, TypeError):
    """An API argument of the wrong type (the message names the argument)."""


class OnnxqValueError(OnnxqError, ValueError):
    """An API argument with a value outside what it accepts (the message names the argument)."""
