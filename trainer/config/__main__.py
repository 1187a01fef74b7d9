"""`python -m trainer.config` prints docs/CONFIG.md's key table."""

from trainer.config.loading import keys_markdown

print(keys_markdown())
