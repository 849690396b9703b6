"""Configs: YAML + ``key=value`` overrides validated by pydantic (:mod:`.loading`), the base of
every config section (:mod:`.base`) and the one registry of plug-ins (:mod:`.registry`)."""

from mera.config.loading import (
                                 apply_override,
                                 dump_config,
                                 format_validation_error,
                                 interpolate_paths,
                                 load_config,
                                 parse_override,
                                 read_yaml,
                                 validate,
)

__all__ = ["apply_override", "dump_config", "format_validation_error", "interpolate_paths", "load_config",
           "parse_override", "read_yaml", "validate"]
