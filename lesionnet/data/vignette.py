"""The dark circular field of many dermatoscopes, as an albumentations transform (albumentations has none).

Contact dermatoscopes image the skin through a round lens: the photo is a bright disc with black (or dark, soft-edged)
corners. HAM10000 has some such images and other clinics many; a model should not read the corners as evidence.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema


class DermatoscopeField(A.ImageOnlyTransform):
    """Darken everything outside a random circle: radius a fraction of the half-diagonal (``radius_range``; 1 leaves
    the corners just touched), a soft edge (``edge_range``, fraction of the shorter side) and the outside kept at a
    fraction of its brightness (``outside_range``; 0 = black)."""

    class InitSchema(BaseTransformInitSchema):
        radius_range: tuple[float, float]
        edge_range: tuple[float, float]
        outside_range: tuple[float, float]
        centre_shift: float

    def __init__(
        self,
        radius_range: tuple[float, float] = (0.6, 1.0),
        edge_range: tuple[float, float] = (0.01, 0.1),
        outside_range: tuple[float, float] = (0.0, 0.15),
        centre_shift: float = 0.05,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        for name, (low, high) in (
            ("radius_range", radius_range),
            ("edge_range", edge_range),
            ("outside_range", outside_range),
        ):
            if not 0 <= low <= high:
                raise ValueError(
                    f"DermatoscopeField.{name} must be (low, high) with 0 <= low <= high, got {(low, high)}."
                )
        self.radius_range = tuple(radius_range)
        self.edge_range = tuple(edge_range)
        self.outside_range = tuple(outside_range)
        self.centre_shift = float(centre_shift)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        shift = self.centre_shift
        return {
            "centre": (
                width / 2 + self.py_random.uniform(-shift, shift) * width,
                height / 2 + self.py_random.uniform(-shift, shift) * height,
            ),
            "radius": self.py_random.uniform(*self.radius_range) * np.hypot(width, height) / 2,
            "edge": max(1.0, self.py_random.uniform(*self.edge_range) * min(width, height)),
            "outside": self.py_random.uniform(*self.outside_range),
        }

    def apply(
        self,
        img: np.ndarray,
        centre: tuple[float, float],
        radius: float,
        edge: float,
        outside: float,
        **params: Any,
    ) -> np.ndarray:
        height, width = img.shape[:2]
        rows, columns = np.ogrid[:height, :width]
        distance = np.hypot(columns + 0.5 - centre[0], rows + 0.5 - centre[1])
        inside = np.clip((radius - distance) / edge + 0.5, 0.0, 1.0)  # 1 inside, 0 outside, linear across the edge
        gain = (outside + (1.0 - outside) * inside).astype(np.float32)
        out = img.astype(np.float32) * (gain[..., None] if img.ndim == 3 else gain)
        return np.clip(np.rint(out), 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("radius_range", "edge_range", "outside_range", "centre_shift")
