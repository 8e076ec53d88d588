"""The ONNX writer: export through torch.onnx, the graph passes and audit, and the weight store."""
