"""One training run: build_session, the loop, per-step bookkeeping, the run folder and its lock, metrics."""
