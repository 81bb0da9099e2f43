"""Weight files offline: read, prune and write them without any framework.

``open_weights`` reads Keras 3 ``.keras`` and ``.weights.h5``, Keras 2 HDF5,
safetensors, PyTorch state dicts (with PyTorch installed), ``.npz`` score
files and sparsecore's sparse HDF5; ``prune_file`` prunes one into the same
format or into sparse HDF5; ``densify_file`` turns sparse HDF5 back into its
source format; ``save_safetensors`` writes arrays (streamed one at a time if
asked) as a safetensors file.
"""

from .errors import FormatError, UserError
from .files import open_weights, save_safetensors
from .formats import Entry, WeightFile
from .offline import FileResult, densify_file, prune_file

__all__ = ["Entry", "FileResult", "FormatError", "UserError", "WeightFile", "densify_file", "open_weights",
           "prune_file", "save_safetensors"]
