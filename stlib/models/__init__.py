"""stlib.models."""
