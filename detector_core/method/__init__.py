"""The detection method: features, models, the loss and optimiser, training, metrics, and the bundle that carries a detector.

Feature families behind one ``extractors.FeatureSpec`` (``features``: frozen CLIP;
``dnf``: the Diffusion Noise Feature), the heads (``model``), ``losses`` (CVaR + pairwise AUC,
exact on the device), ``sam``, ``training`` (the step, with the distributed pieces passed in),
``metrics`` (AUC, TPR at low FPR, calibration with Clopper–Pearson intervals), ``bundle``
(weights + feature spec + threshold + training config, content-hashed), ``cache`` (feature
caches), ``perturb`` and ``shortcuts`` (what evaluation and the shortcut report need).

May import: the root leaves and ``detector_core.sources`` (a feature spec names how its images
are decoded: ``inputs.ClipInput``). Never ``tables``. A new feature family goes here: an
extractor registered in ``extractors.FAMILIES``, and its spec fields in ``FeatureSpec``.
"""
