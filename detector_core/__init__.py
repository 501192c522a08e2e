"""detector_core: the library behind the diffusion-image detector.

Frozen CLIP features (``features``), the paper's MLP (``model``), its CVaR + pairwise
AUC loss (``losses``) optimised with SAM over AdamW (``sam``, ``training``), metrics and
threshold calibration (``metrics``), the detector bundle (``bundle``) and safe image
decoding (``images``); the second detector family's Diffusion Noise Feature (``dnf``,
classified by ``model.NoiseResNet``), with both families behind one ``extractors.FeatureSpec``. Device, rank and world size are always arguments; nothing in
this package imports Ray, so it runs the same in a notebook, a test, or a Ray worker.
"""

__version__ = "0.1.0"
