"""KServe v2 / Open Inference Protocol gRPC layer: protocol stubs, tensor conversion, servicer,
and a small synchronous client.

The generated ``grpc_predict_v2_pb2*`` modules are regenerated with
``python -m service.grpc_v2.generate``; they register the ``inference.*`` protobuf names in the
default descriptor pool, so they cannot be imported alongside another copy of the v2 stubs
(KServe's, tritonclient's) in the same process.
"""
