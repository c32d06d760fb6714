"""LesionNet: dermatoscopic skin-lesion classification (HAM10000) with Lightning, Hydra and timm."""

from lesionnet import models  # noqa: F401  (registers LesionNet models with timm)

__version__ = "0.1.0"
