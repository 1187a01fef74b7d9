"""The typed run configuration: one source of truth for every train.json key.

Keys, types, defaults and help live on `TrainConfig`'s fields. Loading merges, in order of
increasing precedence: field defaults < the JSON file (`--config`) < `--key value` on the command
line. Validation is pydantic's, in strict mode: a JSON value of another type is an error (`"4"`
is not a number, `1` is not `true`; an integer is a valid float), and so are Infinity and NaN.
The command line's texts are first read as each key's type (trainer/config/values.py). This
module turns pydantic's errors into messages that name the file, the key, the value and its
type, what is allowed, and (for unknown keys and names) the closest valid one.

EveryDream2 compatibility: its key names are used unchanged; a JSON `null` means "use the default"
(ED2 ships `"ema_device": null`); keys that ED2 has but that do nothing here are accepted with one
warning each (`IGNORED_KEYS`).
"""

from trainer.config.ed2_keys import IGNORED_KEYS
from trainer.config.loading import (
    allowed_text,
    build_config,
    closest_key,
    config_to_json,
    keys_markdown,
    load_config,
    parse_cli_overrides,
    read_json_config,
)
from trainer.config.schema import FIELDS, LrSchedulerName, TrainConfig

__all__ = [
    "FIELDS",
    "IGNORED_KEYS",
    "LrSchedulerName",
    "TrainConfig",
    "allowed_text",
    "build_config",
    "closest_key",
    "config_to_json",
    "keys_markdown",
    "load_config",
    "parse_cli_overrides",
    "read_json_config",
]
