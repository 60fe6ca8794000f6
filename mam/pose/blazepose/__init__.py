"""BlazePose (MediaPipe's pose networks, mediapipe 0.10.21 wheel) in ONNX, with the graph around it
ported to numpy: ``convert`` (tflite -> ONNX, cached), ``detector``, ``roi``, ``landmarks``,
``smoothing``, ``model`` (single images, batched crops; ONNX Runtime or TensorRT) and ``backend``
(the ``onnx`` video backend). Importing this package imports none of the heavy dependencies.
"""
