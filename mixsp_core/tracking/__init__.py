"""MLflow tracking of training runs, the model registry and the champion's model card."""
