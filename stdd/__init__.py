"""stdd: STDD (Spatiotemporal Dynamic Duo, AAAI 2025) for zero-shot video action recognition with CLIP.

The command lines are ``python -m stdd.train | stdd.eval | stdd.predict | stdd.demo |
stdd.askg``; from Python, ``stdd.predict.predict(videos, classes=..., checkpoint=...)``
classifies videos by action names, and :mod:`stdd.model` holds the model
(``build_stdd``, ``VideoEncoder``, ``STCASettings``). ``import stdd`` imports nothing heavy.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
