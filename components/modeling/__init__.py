"""The embedder network and its MLflow pyfunc wrapper."""
