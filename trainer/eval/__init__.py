"""Samples and validation loss at their steps; explicit inputs, never the session, never the run's RNG."""
