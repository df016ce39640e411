"""Data: the embedded synthetic default, State-style TOML splits, cell-set sampling, the DataModule."""
