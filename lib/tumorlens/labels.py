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


def class_index(label: str) -> int:
    """Index of ``label`` in :data:`CLASS_NAMES`; raises ``KeyError`` with the known labels."""
    try:
        return CLASS_NAMES.index(label)
    except ValueError:
        raise KeyError(f"unknown label {label!r}; expected one of {', '.join(CLASS_NAMES)}") from None
