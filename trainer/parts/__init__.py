"""The run's parts, built from a config: model, attention, lean forwards, step, optimizers,
placement, EMA (`build_components -> Components`). Not named `build/`: tools and the usual
.gitignore templates take a folder of that name for generated output and leave it out."""
