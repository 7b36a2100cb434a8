"""Scipion protocols of localrefine (discovered by Scipion in ``localrefine_plugin.protocols``).

Each protocol converts its inputs to STAR + MRC, runs the ``localrefine``
command through ``runJob`` (so MPI and queues work) and registers its outputs.
Nothing here imports GPU code.
"""

from .protocol_create_mask import ProtLocalRefineCreateMask
from .protocol_import_particles import ProtLocalRefineImportParticles
from .protocol_local_refine import ProtLocalRefine
from .protocol_subtract import ProtLocalRefineSubtract

__all__ = [
    "ProtLocalRefine",
    "ProtLocalRefineCreateMask",
    "ProtLocalRefineImportParticles",
    "ProtLocalRefineSubtract",
]
