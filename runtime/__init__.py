"""Kiln's serving runtime: loads compiled bundles and serves the kiln.v1 gRPC contract.

Depends on numpy, onnxruntime, tokenizers, grpcio and pillow only; never imports torch.
"""
