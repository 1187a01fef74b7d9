"""From a config to built parts: model, attention, lean forwards, step, optimizers, placement, EMA."""
