"""Training samplers (one module each)."""
