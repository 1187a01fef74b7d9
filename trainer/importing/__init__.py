"""Import another trainer's configuration (kohya_ss GUI JSON, sd-scripts TOML) as train.json +
optimizer.json.

Why a package of small tables instead of one converter function: every source key must end up
in the printed table with what it became or why it did not, so the knowledge is data, read by
one engine. `readers` parses the files; `map_training` (LRs, optimizer, clipping),
`map_schedule` (run length, schedule, warmup), `map_options` (model, data, captions, noise,
precision, attention) and `map_output` (saving, sampling, seed, logging) convert the keys that
have a counterpart; `dataset` handles dataset TOMLs and kohya's `N_name` folders; `kohya_keys`
says why the others have none; `convert` runs them and accounts for every key; `writer`
validates and writes. The entry point is `python -m trainer.importing.command`; the rules are in
docs/MIGRATING.md.
"""
