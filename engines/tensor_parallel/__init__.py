"""Tensor parallelism across processes: rank 0 (the engine's own process) drives worker processes that hold the other
shards of the model (``driver``), one per device; ``worker`` is their loop and ``inputs`` the one wire format of a
forward's inputs."""
