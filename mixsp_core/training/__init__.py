"""The training loop and its parts: config, batches, objective, dev report, distributed helpers."""
