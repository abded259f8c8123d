"""The pipeline's stages, one module each, in graph order::

    prepare -> teacher -> train -> compress -> merge -> evaluate -> promote

Each module has one ``run_<stage>(params, ...)`` that the Dagster asset, the ``mixsp <stage>`` subcommand and
the DVC stage all call; it reads its inputs from, and writes its outputs to, the paths of
:class:`mixsp_core.paths.PipelinePaths` (atomically, through :mod:`mixsp_core.io`, and only after its own
checks pass) and returns a small result with a ``summary()``. Stages import the library, never each other's
internals, except for the readers of earlier outputs in :mod:`mixsp_core.stages.prepare`.
"""
