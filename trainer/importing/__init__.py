"""Import another trainer's configuration (kohya_ss GUI JSON, sd-scripts TOML) as train.json +
optimizer.json.

Why a package of small tables instead of one converter function: every source key must end up
in the printed table with what it became or why it did not, so the knowledge is data
(`kohya_keys`: keys with no counterpart and why; `kohya_map`: converters for keys that do have
one), read by one engine (`convert`) and written by one writer (`writer`). The entry point is
`python -m trainer.import_config`; the rules are documented in docs/MIGRATING.md.
"""
