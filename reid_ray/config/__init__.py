"""A run's configuration: the schema and its one precedence list (schema.py), the pre-flight checks
(checks.py), presets, search spaces and a sweep's saved state (sweep.py)."""

from reid_ray.config.schema import (  # noqa: F401 - the package's names
    OptimConfig, ClusteringConfig, NoParams, TrainConfig, SYNTHETIC_DEFAULTS, SYNTHETIC_SWEEP, is_synthetic,
    resolve_config, check_choices, load_config_file, dotted, flatten, valid_keys, set_value, apply_overrides,
    to_dict, from_dict,
)
