"""Where a fit runs and what it leaves: run folders, the cluster environment, MLflow."""
