"""Teacher and student architectures behind one registry, all with the FeatureModel API."""

from ddist.models.base import FeatureModel
from ddist.models.registry import MODEL_NAMES, build_model, preset_names, student_config

__all__ = ["MODEL_NAMES", "FeatureModel", "build_model", "preset_names", "student_config"]
