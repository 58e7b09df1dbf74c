"""MLflow: runs, versions and aliases, the promotion log, and promotion (the one place the pair moves)."""
