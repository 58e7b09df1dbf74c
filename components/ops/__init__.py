"""What keeps writers safe: the writer lock, failpoints for crash tests, transient-error classification."""
