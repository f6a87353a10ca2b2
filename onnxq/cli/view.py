"""`onnxq view`: a model in Netron, the graph viewer, served from this machine.

Netron shows what onnxq recorded: the recipe, target and passes under the model's properties, and on
each node why it is quantized or kept in float (its metadata). Netron is an optional dependency
(`pip install 'onnxq[view]'`); the model is checked as `inspect` checks it before Netron starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from onnxq.errors import OnnxqError

DEFAULT_PORT = 8080


def view(path: str, *, port: int = DEFAULT_PORT, browse: bool = True, say: Callable[[str], None] = print) -> None:
    """Serve `path` in Netron on localhost:`port` until interrupted (Ctrl-C); opens a browser if `browse`."""
    from onnxq.ir.modelio import load_model

    load_model(path)  # a missing, corrupt or non-ONNX file fails here with onnxq's one-line message
    try:
        import netron
    except ImportError:
        raise OnnxqError("onnxq view needs Netron: pip install 'onnxq[view]' (or pip install netron)") from None
    logging.getLogger("netron").setLevel(logging.WARNING)  # its own start/stop lines repeat ours
    try:
        host, bound = netron.serve(str(path), None, ("localhost", port), browse)
    except OSError as exc:
        raise OnnxqError(f"Netron cannot listen on port {port} ({exc.strerror or exc}); choose another with --port") from None
    say(f"Netron shows {path} at http://{host}:{bound}  (onnxq's record: the model's properties, and each "
        "node's metadata; Ctrl-C stops)")
    netron.wait()
