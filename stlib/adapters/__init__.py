"""stlib.adapters."""
