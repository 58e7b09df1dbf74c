"""mnemo's application: Prefect flows that wire components, and the CLI."""
