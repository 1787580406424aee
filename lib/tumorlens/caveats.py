"""Note texts that one stage writes into the findings and a later stage (the report's limitations)
recognises; kept here, free of heavy imports, so both sides use the same words."""

HEAD_TEMPLATE_FAILED = "no pose matches the MNI152 head template"



def not_a_head_note(why: str) -> str:
    """The findings note for a volume that no pose fits to the head template (``why``: the evidence)."""
    return f"{HEAD_TEMPLATE_FAILED} ({why}): the volume may not be a head MRI, or may cover only part of the head"
