"""`fastsd-train`'s configuration: one dataclass tree, loaded from defaults, a YAML file and dotted
overrides, validated before anything else runs.

    tree.py     every key, its default and docstring (`TrainConfig` and its sections)
    load.py     `load_config` (entry point): defaults, then --config, then key=value; `to_dict`, `to_yaml`
    parse.py    a value made the field's type; dotted keys; the line of each key in a YAML file
    check.py    validation: every user error a ValueError naming the key
    dry_run.py  --dry-run's annotated YAML
"""

from .load import load_config, to_dict, to_yaml
from .tree import (
    CheckpointConfig,
    CriticConfig,
    DataConfig,
    EvalConfig,
    FieldsConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TemplateConfig,
    TrainConfig,
)

__all__ = [
    "load_config", "to_dict", "to_yaml", "TrainConfig", "CheckpointConfig", "CriticConfig", "DataConfig",
    "EvalConfig", "FieldsConfig", "LoraConfig", "LossConfig", "ModelConfig", "OptimConfig", "RolloutConfig",
    "TeacherConfig", "TemplateConfig",
]
