"""Quantization stages of the compiler (int8, nf4, fp16): one module per method. None yet; bundles are fp32."""
