"""Integrations with other libraries (imported explicitly; nothing here registers on import)."""
