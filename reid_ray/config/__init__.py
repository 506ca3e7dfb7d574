"""A run's configuration: the schema and its one precedence list (schema.py), the pre-flight checks
(checks.py), presets, search spaces and a sweep's saved state (sweep.py)."""

from reid_ray.config.schema import (  # noqa: F401 - the package's names
    NO_SOURCE,
    SYNTHETIC_DEFAULTS,
    SYNTHETIC_SWEEP,
    ClusteringConfig,
    NoParams,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    check_choices,
    dotted,
    flatten,
    from_dict,
    is_synthetic,
    load_config_file,
    resolve_config,
    set_value,
    to_dict,
    valid_keys,
)
