"""localrefine: local refinement of masked regions for cryo-EM, as a Scipion plugin.

The engine (:mod:`localrefine_plugin.engine`) and the command line
(:mod:`localrefine_plugin.cli`) import nothing from Scipion. The Scipion
``Plugin`` class is created only when Scipion asks for it (PEP 562 module
``__getattr__``), so ``import localrefine_plugin.engine`` works without Scipion
and costs no Scipion start-up.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Plugin", "_references", "_logo"):
        from . import _scipion_plugin

        return getattr(_scipion_plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
