"""The class vocabulary, fixed once so that every head, file and report agrees on its order."""

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
TUMOUR_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "pituitary")
NO_TUMOUR = "no_tumor"
READABLE = {
    "glioma": "glioma",
    "meningioma": "meningioma",
    "pituitary": "pituitary tumour",
    "no_tumor": "no tumour",
}


# other spellings of the four classes in public brain-tumour MRI sets (the Kaggle folders say "notumor",
# "pituitary_tumor", "glioma_tumor"; British English "no_tumour"); matched case-insensitively
ALIASES = {
    "notumor": "no_tumor", "no_tumour": "no_tumor", "notumour": "no_tumor", "no tumor": "no_tumor",
    "no tumour": "no_tumor", "no-tumor": "no_tumor", "no-tumour": "no_tumor", "normal": "no_tumor",
    "healthy": "no_tumor", "glioma_tumor": "glioma", "glioma_tumour": "glioma", "meningioma_tumor": "meningioma",
    "meningioma_tumour": "meningioma", "pituitary_tumor": "pituitary", "pituitary_tumour": "pituitary",
    "pituitary tumor": "pituitary", "pituitary tumour": "pituitary", "pituitary adenoma": "pituitary",
}


def canonical_label(label: str) -> str | None:
    """The class a manifest's label names (exact, any case, or a known alias); ``None`` if none."""
    key = str(label).strip()
    if key in CLASS_NAMES:
        return key
    key = key.lower()
    return key if key in CLASS_NAMES else ALIASES.get(key)


def class_index(label: str) -> int:
    """Index of ``label`` in :data:`CLASS_NAMES`; raises ``KeyError`` with the known labels."""
    try:
        return CLASS_NAMES.index(label)
    except ValueError:
        raise KeyError(f"unknown label {label!r}; expected one of {', '.join(CLASS_NAMES)}") from None
