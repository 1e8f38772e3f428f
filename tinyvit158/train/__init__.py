"""Training (PyTorch, the optional ``train`` extra): a QAT ViT with the engine's numerics,
a resumable trainer, and the exporter to the engine's weight file.

The engine never imports this package.
"""
