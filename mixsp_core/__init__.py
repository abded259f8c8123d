"""MixSP core library: data, encoders, routed projectors, losses, training, compression, merging, evaluation.

Plain, typed Python with no Dagster import; the pipeline, the CLI and the DVC stages all call it.
"""

__version__ = "0.1.0"
