"""The seven HAM10000 diagnosis classes, in the dataset's alphabetical label order."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_LONG_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

# The malignant or pre-malignant classes: the referral rule sums their probabilities; the page marks them.
MALIGNANT: frozenset[str] = frozenset({"mel", "bcc", "akiec"})
