"""stlib.losses."""
