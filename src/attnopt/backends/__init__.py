"""Attention backends. Each is one file with one class declaring its capabilities."""
