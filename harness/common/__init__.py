"""The layer the benchmark and the server share: config composition, model resolution, engine warm-up, errors."""
