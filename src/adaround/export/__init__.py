"""Deployment exports: ONNX QDQ (`export_onnx`), encodings JSON (`export_encodings`), the
AIMET hand-over (`export_aimet`).

The packed weight file is `adaround.save`/`adaround.load` (adaround.io); its bit packing is
`adaround.export.bitpack`. onnx, onnxruntime and safetensors come with `adaround[export]`.
"""

from adaround.export.aimet import export_aimet
from adaround.export.encodings import export_encodings, read_encodings
from adaround.export.onnx_qdq import build_onnx, exact_session_options, export_onnx

__all__ = ["build_onnx", "exact_session_options", "export_aimet", "export_encodings",
           "export_onnx", "read_encodings"]
