"""User-facing error types.

Every error raised for bad input is one of these: its message names the file, key or value
at fault and says how to fix it. `train.py` maps them to exit codes without a traceback;
anything else is a bug and keeps its traceback.
"""


class TrainerError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""

    exit_code = 2


class ConfigError(TrainerError):
    """A train.json / optimizer.json / CLI value is unknown, mistyped or out of range."""


class ModelLoadError(TrainerError):
    """A model path or file cannot be loaded (missing, wrong layout, unsafe pickle)."""


class OptionalDependencyError(TrainerError, ImportError):
    """The chosen optimizer needs a pip package that is missing or fails to import."""


class DataError(TrainerError):
    """The dataset has nothing trainable, or a data_root is unusable."""


class CheckpointError(TrainerError):
    """A checkpoint is incomplete, incompatible with this run, or cannot be resumed."""


class TrainingStopped(TrainerError):
    """The run stopped on purpose (e.g. repeated non-finite losses) after saving its state."""

    exit_code = 3


class RunFinished(TrainerError):
    """Resuming a run that has nothing left to train: said plainly, nothing written, exit 0."""

    exit_code = 0


class NonFiniteWeights(TrainingStopped):
    """A save found NaN or Inf in the trained weights and wrote nothing: a checkpoint of them
    would load and sample as noise, and every later step of this run is skipped anyway. The loop
    turns it into a `TrainingStopped` that names the run's last good state."""


class CheckpointWriteError(TrainerError):
    """A checkpoint could not be written (disk full, quota, I/O error). The partial folder is
    removed and the earlier checkpoints are intact; the message names the last intact one, the
    space the save needed and had, and how to continue. Its own exit code, so that a script can
    tell "free space and resume" from bad input."""

    exit_code = 4


class RunFolderInUse(TrainerError):
    """Another process holds the run folder's lock (two runs writing one folder would delete
    each other's partial checkpoints and replace each other's finished ones)."""
