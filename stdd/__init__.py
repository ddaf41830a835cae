"""stdd: STDD (Spatiotemporal Dynamic Duo, AAAI 2025) for zero-shot video action recognition with CLIP."""

__version__ = "0.1.0"
