"""The executor the pipeline's jobs run their steps on, chosen by run config or the environment, never by code.

Run config ``execution: config:`` picks one of Dagster's own two or Celery:

    multiprocess: {...}   each step in its own process on this machine (the default, and `make run`'s choice)
    in_process: {...}     every step in the run's own process
    celery: {broker: redis://HOST:6379/0}   each step a Celery task, run by whichever `dagster-celery worker`
                          (on this or any other machine) takes it off the broker

``MIXSP_EXECUTOR=celery`` sends the steps to Celery whatever the run config picked: `make run`, the schedule and
the sensors always pass an in-machine choice (pipelines/run.py's multiprocess block), and switching them to the
workers must not need a code change. Broker and result backend then come from ``MIXSP_CELERY_BROKER`` and
``MIXSP_CELERY_BACKEND`` (default: the broker, which suits Redis), the retry policy from the block the run
config chose. Workers are started with the same broker (see the README's Celery section).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import dagster as dg
from dagster_celery import celery_executor
from dagster_celery.executor import CELERY_CONFIG

EXECUTOR_ENV = "MIXSP_EXECUTOR"
BROKER_ENV = "MIXSP_CELERY_BROKER"
BACKEND_ENV = "MIXSP_CELERY_BACKEND"
CELERY = "celery"

# Dagster's default executor's two choices, unchanged, so existing run configs (make run's) stay valid.
_IN_MACHINE = dg.multi_or_in_process_executor.config_schema.config_type.fields

# dagster-celery's block with broker and backend defaulting to the environment instead of RabbitMQ on localhost
# and rpc:// (which a Redis broker cannot carry): None here means "see MIXSP_CELERY_BROKER / _BACKEND".
_CELERY_BLOCK = {
    **CELERY_CONFIG,
    "broker": dg.Field(dg.Noneable(dg.StringSource), is_required=False, default_value=None,
                       description=f"The Celery broker URL, e.g. redis://HOST:6379/0. Default: ${BROKER_ENV}."),
    "backend": dg.Field(dg.Noneable(dg.StringSource), is_required=False, default_value=None,
                        description=f"The Celery result backend URL. Default: ${BACKEND_ENV}, else the broker."),
}


def executor_override() -> str | None:
    """``$MIXSP_EXECUTOR``: ``celery``, or None (unset or empty) to leave the choice to the run config."""
    value = os.environ.get(EXECUTOR_ENV, "").strip()
    if value and value != CELERY:
        raise dg.DagsterInvariantViolationError(
            f"${EXECUTOR_ENV}={value!r}: expected {CELERY!r}, or unset to let the run config "
            "(execution.config: multiprocess / in_process / celery) choose")
    return value or None


def celery_settings(block: Mapping[str, object], retries: object) -> dict[str, object]:
    """dagster-celery's executor config from a ``celery`` block (possibly empty) with the environment's
    broker and backend filled in where the block leaves them out; raises when no broker is known."""
    broker = block.get("broker") or os.environ.get(BROKER_ENV)
    if not broker:
        raise dg.DagsterInvalidConfigError(
            f"Celery executor: no broker. Set ${BROKER_ENV} (e.g. redis://HOST:6379/0) or "
            "execution.config.celery.broker in the run config", [], block)
    backend = block.get("backend") or os.environ.get(BACKEND_ENV) or broker
    return {"broker": broker, "backend": backend, "include": block.get("include") or [],
            "config_source": block.get("config_source"), "retries": retries}


def _resolved(executor_config: Mapping[str, object]) -> tuple[dg.ExecutorDefinition, Mapping[str, object]]:
    """The executor definition that runs the steps and its config, after ``$MIXSP_EXECUTOR``."""
    [(choice, block)] = executor_config.items()  # a Selector: exactly one key
    if choice == CELERY:
        return celery_executor, celery_settings(block, block["retries"])
    if executor_override() == CELERY:
        return celery_executor, celery_settings({}, block["retries"])
    return dg.multi_or_in_process_executor, executor_config


def _requirements(executor_config: Mapping[str, object]) -> Sequence[dg.ExecutorRequirement]:
    definition, config = _resolved(executor_config)
    return definition.get_requirements(config)


@dg.executor(
    name="mixsp",
    config_schema=dg.Field(
        dg.Selector({**_IN_MACHINE, CELERY: dg.Field(_CELERY_BLOCK, description=(
            "Each step a Celery task run by `dagster-celery worker` processes on any machine that reaches the "
            "broker, the repository, the Dagster instance (DAGSTER_HOME) and data/."))}),
        default_value={"multiprocess": {}},
    ),
    requirements=_requirements,
)
def mixsp_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """multiprocess (default), in_process or celery, from run config; ``MIXSP_EXECUTOR=celery`` forces Celery."""
    definition, config = _resolved(init_context.executor_config)
    return definition.executor_creation_fn(init_context._replace(executor_def=definition, executor_config=config))
