"""spm_train: erase concepts from diffusion models with SPM membranes, at scale.

Public API::

    from spm_train import (ConceptSpec, TrainerConfig, load_pipeline, train_membranes,
                           apply_membranes, load_membrane, MembraneBank)

    pipe = load_pipeline("/models/sd-1-5")
    result = train_membranes(pipe, [ConceptSpec("snoopy", "snoopy")], TrainerConfig.preset("paper"))
    result.membranes[0].save("snoopy.safetensors")
    with apply_membranes(pipe, [load_membrane("snoopy.safetensors")]):
        image = pipe("a photo of snoopy").images[0]
"""

from .config import TRAINER_PRESETS, ConceptSpec, TrainerConfig
from .errors import (ConfigError, IncompatibleMembraneError, MembraneFormatError, ModelLoadError, SPMError,
                     UnsupportedModelError)
from .membrane import Membrane, MembraneBank, MembraneLayer, layout_id, load_membrane, membrane_targets
from .models import FAMILIES, ModelAdapter, PromptEmbeds, base_fingerprint, detect_family, load_pipeline
from .training import PackTrainer, TrainingResult, train_membranes
from .transport import MembraneHandle, apply_membranes, permeability

__all__ = [
    "ConceptSpec", "TrainerConfig", "TRAINER_PRESETS",
    "SPMError", "ConfigError", "ModelLoadError", "UnsupportedModelError", "MembraneFormatError",
    "IncompatibleMembraneError",
    "Membrane", "MembraneBank", "MembraneLayer", "membrane_targets", "layout_id", "load_membrane",
    "FAMILIES", "ModelAdapter", "PromptEmbeds", "base_fingerprint", "detect_family", "load_pipeline",
    "PackTrainer", "TrainingResult", "train_membranes",
    "MembraneHandle", "apply_membranes", "permeability",
]
