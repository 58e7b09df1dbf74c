"""Arrivals (inbox, walk, validation, identity, roles, quarantine, store), the catalog and its
manifests, datasets, transforms and demo data."""
