"""Harvard-Oxford atlas regions for lesion masks: registration of volumes to MNI152, placement of
2D slices on template slices, and the mapping of a mask to named structures (``map_regions``)."""

from tumorlens.atlas.harvard_oxford import UNLABELLED, hemisphere_of, labels, readable_name
from tumorlens.atlas.placement import SlicePlacement, place_slice
from tumorlens.atlas.regions import map_regions, summarise_points
from tumorlens.atlas.registration import RegistrationResult, register_to_mni

__all__ = [
    "UNLABELLED",
    "RegistrationResult",
    "SlicePlacement",
    "hemisphere_of",
    "labels",
    "map_regions",
    "place_slice",
    "readable_name",
    "register_to_mni",
    "summarise_points",
]
