"""Jobs: the Ray programs built on detector_core. ``ls jobs/`` shows the verbs; each subpackage holds one verb's parts.

The verbs, each ``python -m jobs.<verb>`` with one dataclass config parsed by ``main(argv)``,
and the same module under ``ray job submit``: ``scan``, ``train``, ``embed``, ``evaluate``,
``ablation``, ``report``, ``audit``, ``maintain``, ``import_d3``, ``submit``, ``demo``.

- ``jobs.common``: what every job shares (``flags``/``options``: the config machinery and
  option groups; ``errors``: ``JobError`` and ``run_main``; ``ray_setup``: a private Ray or a
  checked cluster; ``outputs``: whole files, run ids, an output and its lease).
- ``jobs.scanning``: the scan's parts (``config``, ``planning``, ``refresh``, ``stream``,
  ``decoding``, ``pipeline``: the decode tasks and the ``Scorer``/``Embedder`` actors, which
  ``jobs.training.embedding`` reuses).
- ``jobs.training``: training's parts (``config``, ``worker``: the Ray Train loop,
  ``embedding``: manifests into feature caches).
- ``jobs.reporting``: the review page's parts (``config``, ``thumbnails``, ``page``).

A subpackage may import ``jobs.common`` and another's parts (training reuses the scan's
decode and actors); nothing imports a verb except ``demo``, which runs the others.
"""
