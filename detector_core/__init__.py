"""detector_core: the library behind the diffusion-image detector, in three wings over a few shared leaves.

- ``detector_core.sources``: what a scan reads. Prefix listings, manifests and S3 Inventory
  reports (``listing``, ``manifest``, ``inventory``), image bytes decoded safely (``images``),
  the CPU half of a model's input (``inputs``, ``resize``), the GPU's JPEG path
  (``jpeg_header``, ``device_decode``), the container walkers (``containers``) and what a file
  declares about its origin (``provenance``, ``watermark``).
- ``detector_core.method``: the detector. Frozen CLIP features (``features``) and the
  Diffusion Noise Feature (``dnf``) behind one ``extractors.FeatureSpec``; the paper's MLP and
  the DNF ResNet (``model``); CVaR + pairwise AUC (``losses``) optimised with SAM over AdamW
  (``sam``, ``training``); metrics and threshold calibration (``metrics``); the detector
  bundle (``bundle``), feature caches (``cache``), perturbations (``perturb``) and the
  metadata-shortcut report (``shortcuts``).
- ``detector_core.tables``: the output tables and their lifecycle. A scan output's Iceberg
  tables (``catalog``, ``units``, ``evolution``, ``definitions``, ``iceberg``), the incremental
  state (``state``, ``state_table``), the write lease (``lease``), reading and asking
  (``views``, ``questions``), reviewers' verdicts and the precision sample (``verdicts``,
  ``sampling``, ``csv_cells``) and maintenance (``maintenance``: expiry, compaction, orphans,
  check and repair).

The shared leaves stay at the root and import nothing of ours: ``schema`` (every column name
and type), ``storage`` (local paths and object stores behind fsspec), ``devices`` (CPU/GPU,
precision); ``demo`` makes the demo data. A wing imports the root, itself and the wings below
it: sources < method < tables (``tests/test_layout.py`` checks it, and that no import circle
exists). Device, rank and world size are always arguments; nothing in this package imports
Ray, so it runs the same in a notebook, a test, or a Ray worker (``tests/test_core_imports.py``).
"""

__version__ = "0.1.0"
