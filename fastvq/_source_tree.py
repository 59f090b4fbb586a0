"""Running from a checkout without installing it (``PYTHONPATH=<repo>``, as on a GPU image where
nothing can be installed): an install maps ``kernels/`` to ``fastvq.kernels``; here the same
mapping is made for that one subpackage, and nothing else in the checkout becomes importable
under ``fastvq``."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_NAME = "fastvq.kernels"


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path, target=None):
        if fullname != _NAME:
            return None  # submodules are found through fastvq.kernels.__path__ as usual
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.folder, "__init__.py"), submodule_search_locations=[self.folder]
        )


def map_kernels() -> None:
    """Make ``fastvq.kernels`` importable from the checkout's ``kernels/`` when no install maps it.

    Does not import the kernels (that imports Triton and fixes interpreted vs compiled)."""
    if _NAME in sys.modules or any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec(_NAME) is not None:  # installed (editable or not)
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.meta_path.append(_KernelsFinder(folder))
