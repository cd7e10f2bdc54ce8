"""Running exported models in ONNX Runtime on the CPU."""

from typing import Sequence, Union

import numpy as np

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "Running exported models needs onnxruntime: install the plugin's `export` extra "
        f"(pip install -e '.[export]'). Cause: {e}"
    ) from e


def inference_session(model: Union[str, bytes], threads: int = 1) -> "ort.InferenceSession":
    """A CPU session for `model` (a path or a serialized ModelProto) with
    `threads` intra-op threads that do not spin between runs (spinning
    threads take the cores from whatever runs next)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run(session: "ort.InferenceSession", *inputs: np.ndarray) -> Sequence[np.ndarray]:
    """The session's outputs for its inputs, given in the model's input order."""
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    return session.run(None, dict(zip(names, inputs)))
