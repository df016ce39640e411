"""stlib."""
