"""Why an image lies outside what the model was trained on, as far as the cheap checks of ``predict`` tell: a
modality that is not MR, a picture in colour or without a dark frame, a volume no head pose fits. The
active-learning strategies hand such images out after the others: the least certain images of a datastore
were a torso phantom, a 64-voxel crop and a label file uploaded as an image, ahead of every brain volume."""

from __future__ import annotations

import numpy as np
from monai.data import MetaTensor


def scope_problems(img: MetaTensor) -> list[str]:
    """The caveats ``predict`` would give ``img`` for what it is (not for what the model answers)."""
    from tumorlens.inference import image_caveats

    found = image_caveats(img)
    plane = np.squeeze(img.detach().cpu().numpy()[0])
    if plane.ndim == 3:
        from tumorlens.atlas.registration import head_template_check

        found.append(head_template_check(img)[1])
    return [c for c in found if c]
