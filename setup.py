"""Build script: packaging metadata lives in pyproject.toml.

This file exists for the C++/CUDA extension (``csrc/``), which setuptools can
only describe in code. The extension is added in ``_extensions()``; a machine
without torch, a compiler or the sources still gets a working pure-Python
install (the reference and Triton backends).
"""

from setuptools import setup


def _extensions():
    """No compiled extension yet: csrc/ holds no sources (see README status table)."""
    return [], {}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
