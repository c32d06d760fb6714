"""Plain-language text shown to users: class names, descriptions, disclaimers and the model card's fixed parts.

Kept apart from the logic so wording can be reviewed (clinically and for readability) without reading code.
"""

from __future__ import annotations

from lesionnet.classes import CLASS_LONG_NAMES

DISCLAIMER = (
    "This is not a diagnosis. LesionNet is research software, not a medical device. Only a doctor who examines "
    "the skin can tell what a lesion is. If a spot is new, changing, bleeding, itching or worries you, see a doctor."
)

# HAM10000 codes -> (plain name, one-sentence description). Malignant or pre-malignant classes are in MALIGNANT.
PLAIN_CLASSES: dict[str, tuple[str, str]] = {
    "akiec": (
        "Actinic keratosis or early skin cancer",
        "Rough, scaly sun-damage patch that can turn into a skin cancer (includes Bowen's disease).",
    ),
    "bcc": (
        "Basal cell carcinoma",
        "The most common skin cancer; grows slowly and rarely spreads, but needs treatment.",
    ),
    "bkl": (
        "Benign keratosis",
        "Harmless growths such as seborrhoeic keratoses, solar lentigines ('age spots') and lichen-planus-like "
        "keratoses.",
    ),
    "df": ("Dermatofibroma", "A harmless firm bump in the skin, often on the legs."),
    "mel": ("Melanoma", "A serious skin cancer of the pigment cells; found early it can usually be cured."),
    "nv": ("Mole (melanocytic nevus)", "A common, harmless mole."),
    "vasc": ("Vascular lesion", "Harmless blood-vessel spots such as cherry angiomas or angiokeratomas."),
}
MALIGNANT: frozenset[str] = frozenset({"mel", "bcc", "akiec"})


def plain_name(code: str) -> str:
    """The user-facing name of a class (falls back to the dataset's long name, then the code)."""
    return PLAIN_CLASSES.get(code, (CLASS_LONG_NAMES.get(code, code), ""))[0]


def description(code: str) -> str:
    return PLAIN_CLASSES.get(code, ("", CLASS_LONG_NAMES.get(code, "")))[1]


MESSAGES: dict[str, str] = {
    "refer": "Some features look like a skin cancer. Please see a dermatologist (skin doctor) soon - within a few "
    "weeks - and show them this spot.",
    "routine": "Nothing here looks urgent to the model. Keep an eye on the spot and see a doctor if it changes, "
    "bleeds, itches or worries you.",
    "unsure": "The model is not sure about this image, so it gives no answer. If you are worried about the spot, "
    "see a doctor.",
    "rejected": "This does not look like a close-up photo of a skin lesion, so the model gives no answer. Take a "
    "sharp, well-lit close-up of the spot (ideally through a dermatoscope) and try again.",
}

INTENDED_USE = (
    "Research and education: to show what a classifier trained on dermatoscopic images does with an image. Not for "
    "diagnosis, screening or treatment decisions, and not a substitute for a doctor."
)
TRAINING_DATA = (
    "HAM10000 (Tschandl et al. 2018, CC BY-NC 4.0): 10,015 dermatoscopic images of 7,470 pigmented lesions from "
    "two centres (Vienna, Austria and Queensland, Australia), 7 diagnoses; about two thirds are moles (nv). Splits "
    "are by lesion, so no lesion is in both training and test data."
)
LIMITATIONS: tuple[str, ...] = (
    "Trained on dermatoscope images: ordinary phone photos (without a dermatoscope) look different and the model is "
    "less reliable on them.",
    "Patients in HAM10000 are mostly fair-skinned; performance on darker skin is unknown and likely worse.",
    "Only 7 diagnoses are known to the model. Other conditions (for example nail, mucosal or rare tumours, rashes, "
    "infections) will be forced into one of these classes or refused.",
    "Classes are imbalanced (few dermatofibromas and vascular lesions); rare classes are recognised less reliably.",
    "The 'unsure' and 'not a lesion photo' checks are simple heuristics: they catch blank, synthetic and very "
    "unusual images but not every out-of-scope photo.",
    "The referral threshold is only validated when the server was started with an evaluate.py scores.json.",
)
