"""Evaluation of checkpoints and ensembles: metrics, calibration, plots and the evaluate.py pipeline.

Modules: ``metrics`` (pure functions on probabilities, and the fits made on validation: temperature, logit
adjustment, ensemble weights), ``plots`` (matplotlib), ``datasets`` (external sets, ISIC format), ``guard`` (the
training-leak check), ``oof`` (out-of-fold figures), ``report`` (Markdown) and ``runner`` (what evaluate.py calls).
Loading and predicting are the inference core's (``lesionnet.inference``); applying the fits is
``lesionnet.inference.decision.combine``'s.
"""
