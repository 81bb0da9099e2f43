"""Weight files offline: read, prune and write them without any framework.

``open_weights`` reads Keras 3 ``.keras`` and ``.weights.h5``, Keras 2 HDF5,
safetensors, PyTorch state dicts (with PyTorch installed), ``.npz`` score
files and sparsecore's sparse HDF5; ``prune_file`` prunes one into the same
format or into sparse HDF5; ``densify_file`` turns sparse HDF5 back into its
source format.
"""

from .errors import FormatError
from .files import open_weights
from .formats import Entry, WeightFile
from .offline import FileResult, UserError, densify_file, prune_file

__all__ = ["Entry", "FileResult", "FormatError", "UserError", "WeightFile", "densify_file", "open_weights",
           "prune_file"]
