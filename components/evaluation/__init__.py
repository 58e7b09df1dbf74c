"""Evaluation: retrieval and few-shot metrics, forgetting, the gate and its report."""
