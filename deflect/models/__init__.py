"""Model architectures; every model takes [0,1] images and normalises inside."""

from deflect.models.factory import ARCHS, build_model

__all__ = ["ARCHS", "build_model"]
