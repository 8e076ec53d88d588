"""Baked checkpoints out: .safetensors with a checked manifest, .pt, .pt2."""
