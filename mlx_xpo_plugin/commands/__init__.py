"""What users run: the mlx-xpo command, one run from settings to adapters (runner), prompt data,
the adapter-folder lock, hints and the offline random models."""
