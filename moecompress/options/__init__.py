"""Stage options: one pydantic model per stage (see ``base`` for how CLI, library and recipe
are generated from it)."""

from .base import Options, cli_command, default_of, fields, flags_of, library_function, option, recipe_fields, validate
from .groups import (DEFAULT_CALIB, DEFAULT_N, DEFAULT_SEQ_LEN, CalibrationOptions, LoadingOptions, OutputOptions,
                     StreamingOptions)
from .stages import (STAGE_OPTIONS, DistillOptions, EvalOptions, MergeOptions, PruneOptions, QuantizeOptions,
                     StatsOptions, UploadOptions)

__all__ = ["Options", "option", "fields", "recipe_fields", "flags_of", "default_of", "validate", "cli_command",
           "library_function", "DEFAULT_CALIB", "DEFAULT_N", "DEFAULT_SEQ_LEN", "CalibrationOptions",
           "LoadingOptions", "StreamingOptions", "OutputOptions", "STAGE_OPTIONS", "StatsOptions", "PruneOptions",
           "MergeOptions", "EvalOptions", "UploadOptions", "QuantizeOptions", "DistillOptions"]
