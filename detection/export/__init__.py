"""Export of a detector to ONNX and TorchScript, and the check of the exported file against the eager
model (tools/export.py)."""
