"""Evaluation of checkpoints and ensembles: metrics, calibration, plots and the evaluate.py pipeline.

Modules: ``metrics`` (a package of pure functions on probabilities, one module per concern: classification,
calibration, operating points, bootstrap, and the fits made on validation: temperature, logit adjustment, ensemble
weights), ``plots`` (matplotlib), ``external_sets`` (external image folders and their labels), ``guard`` (the
training-leak check), ``oof`` (out-of-fold figures), ``eval_report`` (report.md) and ``runner`` (what evaluate.py
calls). Loading and predicting are the inference core's (``lesionnet.inference``); applying the fits is
``lesionnet.inference.decision.combine``'s; the ISIC 2018 files are ``lesionnet.data.isic``'s.
"""
