"""Decisions on top of the inference core's outputs: what the served answer, evaluate.py and export all apply.

- ``combine``: the weighted ensemble mean, post-hoc logit adjustment, temperature scaling and the per-class scaling of
  the shown probabilities (numpy, on probabilities); the core's :class:`~lesionnet.inference.Predictor` combines its
  members with it.
- ``policy``: the referral rule ("see a dermatologist") and the confidence gate ("unsure").
- ``ood``: the feature-space out-of-distribution detector, its fit and its file.
- ``image_check``: the model-free check that an upload could be a lesion photo at all.

Fitting what depends on labelled validation data (ensemble weights, tau, the temperature) is evaluate.py's
(``lesionnet.evaluation.metrics``); applying it is done here only. This ``__init__`` imports nothing: the core imports
``combine`` while ``policy`` and ``ood`` read the core's outputs.
"""
