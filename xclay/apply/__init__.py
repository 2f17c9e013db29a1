"""From embeddings to a map: labels joined to chips (``labels``), light models fitted and
checked by spatial cross-validation (``model``, ``checking``), and the map predicted over a
whole embeddings store (``predict``).

It may import the layers below it (outputs, datacube, the batch path's chip grid, storage);
nothing below imports this package.
"""

from xclay.apply.checking import CheckingWarning, estimate_block
from xclay.apply.labels import ChipLabels, join_labels, read_labels
from xclay.apply.model import MapModel, fit, load_model
from xclay.apply.predict import PALETTE, MapFiles, predict, write_map

__all__ = [
    "PALETTE",
    "CheckingWarning",
    "ChipLabels",
    "MapFiles",
    "MapModel",
    "estimate_block",
    "fit",
    "join_labels",
    "load_model",
    "predict",
    "read_labels",
    "write_map",
]
