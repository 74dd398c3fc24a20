"""The configuration: schema (schema.py), the one loader (loader.py), the original code's layout (original.py) and
the checks of the device and dataset a config names (checks.py). Import from here."""

from .checks import DATASET_ERRORS, check_dataset, check_device, dataset_errors
from .loader import find_stage, load_config, stage_outputs, stage_plan, stage_train_args, train_args_problem
from ..io import MODEL_SIZES
from .schema import (C2PSA_MODES, MAX_STRIDE, PROJECT_SET_ARGS, REPO_ROOT, BaseConfig, ConfigError,
                     DistillConfig, ProjectConfig, QuantizationConfig, StageConfig, TrainConfig, first_line,
                     imgsz_problem, message_lines)

__all__ = ["C2PSA_MODES", "DATASET_ERRORS", "MAX_STRIDE", "MODEL_SIZES", "PROJECT_SET_ARGS", "REPO_ROOT", "BaseConfig",
           "ConfigError", "DistillConfig", "ProjectConfig", "QuantizationConfig", "StageConfig", "TrainConfig",
           "check_dataset", "check_device", "dataset_errors", "find_stage", "first_line", "imgsz_problem",
           "load_config", "message_lines", "stage_outputs", "stage_plan", "stage_train_args", "train_args_problem"]
