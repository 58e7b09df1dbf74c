"""The query service: the live pair, the FastAPI app and its page, dynamic batching."""
