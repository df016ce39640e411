"""stlib.evaluate."""
