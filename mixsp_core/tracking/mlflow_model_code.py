"""The code of the MixSP MLflow model ("models from code"): MLflow runs this file to build the model, so
loading a registered MixSP model unpickles nothing. See :mod:`mixsp_core.tracking.mlflow_model`."""

import mlflow

from mixsp_core.tracking.mlflow_model import EmbedderModel

mlflow.models.set_model(EmbedderModel())
