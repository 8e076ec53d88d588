"""Checkpoints in: state dicts, safetensors, training checkpoints, pickles, torch.export programs, model folders."""
