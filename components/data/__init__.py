"""Arrivals, validation, the class registry, datasets, transforms and demo data."""
