"""The dataset classes (one module each), registered by name in :mod:`data.registry`."""
