"""One module per runtime that runs a graph for verify (onnxruntime today)."""
