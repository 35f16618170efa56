"""The exception types medlens raises; each message names the bad value and what to do."""


class MedlensError(Exception):
    """Base class for every error medlens raises on purpose."""


class ImageReadError(MedlensError, ValueError):
    """An image file could not be read: empty, truncated, not an image, too large, unsupported."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class DataSourceError(MedlensError, ValueError):
    """A data source (folder, CSV, NIH metadata) is missing, malformed, or ambiguous."""


class LeakageError(MedlensError):
    """A patient appears in more than one split."""


class ConfigError(MedlensError, ValueError):
    """A configuration key or value is invalid."""


class CheckpointError(MedlensError):
    """A checkpoint is missing, incomplete, or unsafe to load."""


class WeightsUnavailableError(CheckpointError):
    """Pretrained weights cannot be had here: the hub is out of reach, or a named file is not where it belongs."""


class CacheError(MedlensError, ValueError):
    """A preprocessing cache is unfinished, or was built for other images or settings than asked."""


class OutOfMemory(MedlensError):
    """A batch did not fit in the device's memory; the message names a batch size that does."""


class UsageError(MedlensError, ValueError):
    """A command-line or serving setting that cannot work (a port in use, a device that is not there)."""
