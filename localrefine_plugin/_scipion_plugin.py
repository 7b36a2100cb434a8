"""The Scipion ``Plugin`` class of localrefine.

:mod:`localrefine_plugin` exposes :class:`Plugin` lazily (PEP 562), so this
module, and with it Scipion, is imported only when Scipion asks for the plugin.
"""

from __future__ import annotations

import os
import shutil
import sys

import pwem
import pyworkflow.utils as pwutils

from . import __version__
from .constants import LOCALREFINE_PROGRAM_VAR, URL

__all__ = ["Plugin", "default_program"]

_PACKAGE = "localrefine_plugin"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: Citation keys (from :mod:`localrefine_plugin.bibtex`) of the method.
_references = ["Punjani2017", "Punjani2020", "Scheres2012", "Chen2013"]
_logo = "logo.png"


def default_program() -> str:
    """The ``localrefine`` launcher of this interpreter, else the one on ``PATH``."""
    beside = os.path.join(os.path.dirname(sys.executable), "localrefine")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("localrefine") or "localrefine"


class Plugin(pwem.Plugin):
    """localrefine: local refinement of masked regions (pip-installed, no binaries)."""

    _url = URL
    _supportedVersions = [__version__]

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(
            LOCALREFINE_PROGRAM_VAR,
            default_program(),
            description="The localrefine program the protocols run",
        )

    @classmethod
    def getEnviron(cls):
        """The environment of the ``localrefine`` jobs: the caller's, unchanged."""
        return pwutils.Environ(os.environ)

    @classmethod
    def getProgram(cls) -> str:
        """Path of the ``localrefine`` program (variable ``LOCALREFINE_PROGRAM``)."""
        return cls.getVar(LOCALREFINE_PROGRAM_VAR) or default_program()

    @classmethod
    def defineBinaries(cls, env):
        """Nothing to install: the engine is this Python package."""

    @classmethod
    def validateInstallation(cls):
        program = cls.getProgram()
        if shutil.which(program) is None:
            return [
                f"The localrefine program was not found: {program}. Reinstall the "
                f"plugin (pip install scipion-em-localrefine) or set "
                f"{LOCALREFINE_PROGRAM_VAR}."
            ]
        return []

    # The class lives in a private module; Scipion derives the plugin's name and
    # folder (templates, protocols.conf) from the class's module, so name the
    # package itself.
    def getName(self) -> str:
        return _PACKAGE

    def getPath(self) -> str:
        return _PACKAGE_DIR
