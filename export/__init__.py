"""torch -> ONNX -> TensorRT for the MAM networks, with parity checks.

``python -m export onnx [--out DIR]`` writes ``models/NAME.{clip,bag,info}.onnx`` and the
manifest ``models/NAME.onnx.json`` (``export.onnx.export_onnx``); ``python -m export tensorrt``
builds TensorRT engines from them into a cache on the machine that serves them
(``mam.runtime.build_engines``). The ONNX side needs torch; the TensorRT side does not.
"""
