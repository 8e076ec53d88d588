"""Files, pages and threads: safe output paths, memory-mapped weights, worker threads. Knows nothing of models."""
