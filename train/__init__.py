"""Training and fine-tuning of models Kiln ships (PyTorch; never imported by the runtime)."""
