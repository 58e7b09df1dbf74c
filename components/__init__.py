"""mnemo's library: plain functions and classes; orchestration lives in flows/."""
