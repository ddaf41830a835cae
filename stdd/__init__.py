"""stdd: STDD (Spatiotemporal Dynamic Duo, AAAI 2025) for zero-shot video action recognition with CLIP.

``stdd.predict(videos, classes=..., checkpoint=...)`` classifies videos by action names
(see :mod:`stdd.predict`); the command lines are ``python -m stdd.train | stdd.eval |
stdd.predict | stdd.demo``.
"""

import sys
import types

__version__ = "0.1.0"


def predict(videos, classes=None, **options):
    """Top-k actions of ``videos`` among ``classes``; see :func:`stdd.predict.predict`.

    (A function, not an import of the submodule, so ``import stdd`` stays light.)
    """
    import importlib

    module = importlib.import_module("stdd.predict")
    return module.predict(videos, classes, **options)


class _Package(types.ModuleType):
    # Importing the submodule stdd/predict.py would rebind the package attribute
    # `predict` to that module; keep the function (as stdd_kernels does for its ops).
    def __setattr__(self, name, value):
        if name == "predict" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", "predict"]
