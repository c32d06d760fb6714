"""Model definitions; importing this package registers LesionNet's own models with timm."""

from lesionnet.models import baseline  # noqa: F401  (registers lesionnet_baseline*)
