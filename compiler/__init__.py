"""Kiln's offline compiler: source model -> verified, optimized ONNX bundle."""
