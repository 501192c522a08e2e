"""Training's parts (``python -m jobs.train`` is the command): its config, the Ray Train worker loop, and embedding manifests into feature caches."""
