"""Plain-language text shown to users: class names, descriptions, disclaimers and the model card's sentences.

Kept apart from the logic so wording can be reviewed (clinically and for readability) without reading code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lesionnet.classes import CLASS_LONG_NAMES
from lesionnet.contract.scores import ScoresFile, ScoresRow

DISCLAIMER = (
    "This is not a diagnosis. LesionNet is research software, not a medical device. Only a doctor who examines "
    "the skin can tell what a lesion is. If a spot is new, changing, bleeding, itching or worries you, see a doctor."
)

# HAM10000 codes -> (plain name, one-sentence description). Malignant or pre-malignant classes are in
# lesionnet.classes.MALIGNANT.
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
    "unsure": "Unsure: the model cannot tell what this lesion is, so it names no diagnosis. Have the spot checked by "
    "a doctor (a dermatologist).",
    "unfamiliar": "Unsure: the model has not seen lesions like this one, so it names no diagnosis. Have the spot "
    "checked by a doctor (a dermatologist).",
    "not_dermoscopy": "This app reads dermatoscope images: close-ups taken through a dermatoscope (a magnifier with "
    "its own light that touches the skin; clip-on ones exist for phones). This picture does not look like one, and "
    "the model cannot assess an ordinary photo, so it gives no answer. If a spot is new, changing, bleeding or worries "
    "you, show it to a doctor.",
    "rejected": "This does not look like a close-up photo of a skin lesion, so the model gives no answer. Take a "
    "sharp, well-lit close-up of the spot (ideally through a dermatoscope) and try again.",
}

MOST_LIKELY = "Most likely: {name}."  # the answer's message when it names a class (the on-device page fills it too)
# ... when the class decided on the model's scores does not have the highest shown (calibrated) percentage, as with a
# logit-adjusted model, which decides for balanced accuracy and shows probabilities of the class mix
DECIDED = (
    "The model's answer: {name}. It is decided on the model's own scores; the percentages are calibrated to how "
    "common each diagnosis is, so another diagnosis can show a higher percentage."
)
# how the shown percentages are computed (DisplayCalibration.method), for the model card
SHOWN_CALIBRATION: dict[str, str] = {
    "temperature": "rescaled with one temperature",
    "prior-undo+temperature": "computed with the logit adjustment taken back out (the answer itself is decided with "
    "it, to find rare diagnoses as often as common ones) and rescaled with one temperature",
    "bias+temperature": "rescaled with one temperature and a correction per diagnosis",
    "vector": "rescaled with a scale and a correction per diagnosis",
}

NOT_DERMOSCOPY_REASON = (
    "The image-type check (a classifier of dermatoscope images against ordinary and phone photos) scored it as not a "
    "dermatoscope image."
)


def unfamiliar_reason(quantile: float) -> str:
    """Why the familiarity flag sends an image to a doctor (the gate's quantile of validation lesions)."""
    return (
        f"The lesion is unlike the ones the model learnt from: stranger than {quantile:.1%} of its validation lesions "
        "(a distance in the model's features), so its answer would be a guess."
    )


def unsure_reason(score: str, threshold: float, source: str) -> str:
    """Why the confidence gate sends an image to a doctor (the on-device page gets "{score}")."""
    return f"The model's confidence {score} is below its threshold {threshold:.2f} ({source})."


INTENDED_USE = (
    "Research and education: to show what a classifier trained on dermatoscopic images does with an image. Not for "
    "diagnosis, screening or treatment decisions, and not a substitute for a doctor."
)
DATASET = (
    "HAM10000 (Tschandl et al. 2018, CC BY-NC 4.0) is a set of 10,015 dermatoscopic images of 7,470 pigmented "
    "lesions from two centres (Vienna, Austria and Queensland, Australia), 7 diagnoses; about two thirds are moles."
)
SAMPLE_FOLDER = "the 286-image HAM10000 sample shipped with LesionNet"
TRAINING_UNKNOWN = (
    "Unknown: the checkpoint records no training images (it predates provenance records) and is not inside the "
    "train.py run folder that made it."
)
SPLIT_UNKNOWN = "How the images were split is unknown (no metrics.json of the training run)."


def images_phrase(images: dict[str, int]) -> str:
    """'200 images (43 more for validation, 43 held out for testing)' from per-split image counts."""
    extra = {"val": "more for validation", "test": "held out for testing"}
    others = [f"{n:,} {extra.get(split, f'in the split {split!r}')}" for split, n in images.items() if split != "train"]
    main = f"{images['train']:,} images" if "train" in images else "an unknown number of images"
    return main + (f" ({', '.join(others)})" if others else "")


def split_description(method: str, seed: int | None, fractions: dict[str, float] | None, split_file: str | None) -> str:
    """How a run split its images into training, validation and test, in plain words."""
    if split_file:
        return f"Split as saved in the file '{split_file}' of an earlier run."
    if method == "legacy":
        return (
            f"Split by image (the seed project's legacy split, seed {seed}): images of one lesion can be in both "
            "training and test, so test figures are optimistic."
        )
    names = {"train": "training", "val": "validation"}
    shares = " / ".join(f"{fractions[s]:.0%} {names.get(s, s)}" for s in fractions) if fractions else ""
    return (
        f"Split by lesion (seed {seed}{'; ' + shares if shares else ''}): no lesion has images in more than one of "
        "training, validation and test."
    )


def training_sentence(images: dict[str, int], folder: str | None, is_sample: bool, split: str | None) -> str:
    """One model's training data: counts, where they came from and how they were split."""
    if not images:
        return TRAINING_UNKNOWN
    source = f" from {SAMPLE_FOLDER}" if is_sample else (f" from the data folder '{folder}'" if folder else "")
    return f"Trained on {images_phrase(images)}{source}. {split or SPLIT_UNKNOWN}"


def demo_notice(train_images: int | None) -> str:
    """The banner shown on every screen when the served model was trained on the embedded sample."""
    learnt = f" It learnt from only {train_images:,} images, so its" if train_images else " Its"
    return (
        f"Demo model - not trained on the full data.{learnt} answers are only for trying the app, not for judging a "
        "real spot."
    )


DEMO_SAMPLE_ROOT = f"Its training run's data root is {SAMPLE_FOLDER}."


def demo_few_images(train_images: int) -> str:
    return (
        f"Its checkpoint records only {train_images:,} training images; the full HAM10000 split trains on about 7,000."
    )


# ----------------------------------------------------------------------------- is the referral rule checked?

REFERRAL_NOT_CHECKED = "This rule has not been checked on held-out images for this model."


def referral_checked(n_images: int, melanomas: int | None, sensitivity: float, in_sample: bool) -> str:
    """Under the urgency message: on how many images the 'see a dermatologist' rule was checked, and what it caught.

    "At least": the melanoma threshold alone caught ``sensitivity`` of them; the malignant-sum rule can only add. So
    it says the count when there is one ("at least 165 of the 174 melanomas", the model card's count), else the
    share rounded down (94.8% is "at least 94%", never "at least 95%").
    """
    caught = caught_count(sensitivity, melanomas)
    if caught is not None:
        share = f"{caught:,} of the {melanomas:,} melanomas"
    else:
        share = f"{math.floor(sensitivity * 100 + 1e-9)}%" + (f" of the {melanomas:,} melanomas" if melanomas else "")
    if in_sample:
        return (
            f"The 'see a dermatologist' rule was only checked on the {n_images:,} validation images it was tuned on: "
            f"it caught at least {share} there, and may catch fewer on new images."
        )
    return (
        f"The 'see a dermatologist' rule was checked on {n_images:,} held-out images: it caught at least {share} there."
    )


def caught_count(sensitivity: float, melanomas: int | None) -> int | None:
    """How many of ``melanomas`` a sensitivity is, when it is a whole number of them (scores.json keeps the share)."""
    caught = sensitivity * melanomas if melanomas else None
    if caught is None or abs(caught - round(caught)) > 1e-6:
        return None
    return round(caught)


# ----------------------------------------------------------------------------- test figures

NOT_EVALUATED = "Not evaluated: the server was started without an evaluate.py scores.json, so performance is unknown."


def percent_with_interval(value: float | None, interval: Sequence[float | None] | None) -> str:
    """'71.0% (95% CI 68.0-74.0%)', or 'unknown'."""
    if value is None:
        return "unknown"
    text = f"{value:.1%}"
    if interval and None not in interval:
        text += f" (95% CI {interval[0]:.1%}-{interval[1]:.1%})"
    return text


def melanomas_caught(sensitivity: float, melanomas: int | None, interval: Sequence[float | None] | None) -> str:
    """'7 of the 8 melanomas (88%; 95% CI 50%-100%)': the count when the share is a whole number of them, so that a
    percentage of a handful of melanomas is not read as a precise rate; else '93% of the melanomas'."""
    caught = caught_count(sensitivity, melanomas)
    if caught is None:
        return f"{sensitivity:.0%} of the melanomas"
    ci = f"; 95% CI {interval[0]:.0%}-{interval[1]:.0%}" if interval and None not in interval else ""
    return f"{caught:,} of the {melanomas:,} melanomas ({sensitivity:.0%}{ci})"


def performance_summary(scores: ScoresRow, evaluated: ScoresFile, provenance: list[str]) -> str:
    """The model card's test figures in a few sentences: accuracy and balanced accuracy with their intervals, what
    the intervals resample, melanoma sensitivity, calibration and whether the scored images were checked unseen (an
    in-sample set is the validation images: never called unseen)."""
    count = f"{evaluated.n_images:,} " if evaluated.n_images else ""
    accuracy = percent_with_interval(scores.accuracy, scores.ci95.get("accuracy"))
    balanced = percent_with_interval(scores.balanced_accuracy, scores.ci95.get("balanced_accuracy"))
    sentences = [
        f"On the {count}images of the {evaluated.evaluated or 'evaluation set'}: accuracy {accuracy}, "
        f"balanced accuracy (mean over the 7 diagnoses) {balanced}."
    ]
    if evaluated.bootstrap:
        sentences.append(f"Intervals: {evaluated.bootstrap.description}.")
    if evaluated.in_sample:
        sentences.append(
            "These are the validation images the model and its thresholds were chosen on (not trained on), so the "
            "figures are optimistic."
        )
    at_threshold = scores.at_val_threshold
    if at_threshold is not None and at_threshold.sensitivity is not None:
        cleared = at_threshold.specificity
        melanoma = scores.per_class.get("mel")
        caught = melanomas_caught(
            at_threshold.sensitivity, melanoma.support if melanoma else None, scores.ci95.get("mel_sensitivity")
        )
        sentences.append(
            f"The melanoma threshold of the referral rule was set on validation images to catch "
            f"{at_threshold.target_sensitivity:.0%} of melanomas; on these images it caught {caught}"
            + (f" and did not flag {cleared:.0%} of the other lesions." if cleared is not None else ".")
        )
    if scores.display is not None and scores.displayed is not None:
        shown = scores.displayed
        sentences.append(
            f"Calibration: the shown probabilities are {SHOWN_CALIBRATION[scores.display.method]}, fitted on "
            f"validation images; here their expected calibration error is {shown.ece:.1%} for the top diagnosis and "
            f"{shown.classwise_ece:.1%} per diagnosis (log loss {shown.log_loss:.3f}, Brier score {shown.brier:.3f})."
        )
    elif scores.temperature is not None:
        after = scores.ece_after_temperature
        sentences.append(
            f"Calibration: the shown probabilities are rescaled with a temperature of {scores.temperature:.2f} "
            "fitted on validation images"
            + (f"; the expected calibration error after it is {after:.1%}." if after is not None else ".")
        )
    if provenance:
        checked = all(p == "checked" for p in provenance)
        if not checked:
            sentences.append(
                "Whether the scored images were unseen in training is unknown (the checkpoint predates provenance "
                "records)."
            )
        elif evaluated.in_sample:  # checked against training only: validation images are what was scored
            sentences.append(
                "None of them was used in training (checked by content), but they are not new to the model: they "
                "chose it."
            )
        else:
            sentences.append("None of the scored images was used in training or validation (checked by content).")
    return " ".join(sentences)


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
