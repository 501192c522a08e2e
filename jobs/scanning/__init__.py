"""The scan's parts (``python -m jobs.scan`` is the command): its config, the plan, the state refresh, the stream and its stages.

``config`` (``ScanConfig``), ``planning`` (listing + anti-join, in the driver or on the
cluster), ``refresh`` (folding new history into the state), ``stream`` (the one Ray Data
stream and the driver's commit loop), ``decoding`` (CPU decode tasks), ``pipeline`` (the
``Scorer`` and ``Embedder`` actors; ``jobs.training.embedding`` reuses them).
"""
