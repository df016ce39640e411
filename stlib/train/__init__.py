"""stlib.train."""
