"""Evaluation of checkpoints and ensembles: metrics, calibration, plots and the evaluate.py pipeline.

Modules: ``metrics`` (pure functions on probabilities), ``plots`` (matplotlib), ``checkpoints`` (safe
loading), ``datasets`` (run splits, external sets, ISIC format), ``predict`` (inference, TTA),
``report`` (Markdown) and ``runner`` (what evaluate.py calls).
"""
