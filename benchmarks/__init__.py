"""`make bench`: encode speed and memory of mixsp against sentence-transformers, retrieval at 128 vs full
dimensions, and pipeline stage times. Entry point: ``python -m benchmarks.run`` (see its ``--help``).

Nothing in this package imports Dagster, MLflow or great-expectations at module level, so the GPU run
works with only torch, transformers, sentence-transformers and the project code on ``PYTHONPATH``.
"""
