"""The exceptions sku-fast raises for bad input. The CLI prints their message, no traceback."""


class SkuFastError(Exception):
    """Base class: something the user gave us is wrong; the message says what and what to do."""


class CheckpointError(SkuFastError):
    """A checkpoint, adapter or output path is unusable (names the file, tensor and problem)."""


class DataError(SkuFastError):
    """A dataset file is missing, empty or lacks the columns we need."""


class TrainingError(SkuFastError):
    """Training cannot go on (bad model path, non-finite loss, inconsistent resume state)."""


class ConfigError(SkuFastError, ValueError):
    """A setting is of the wrong type, not finite or out of range, or a settings file is
    unreadable (names the field or file and the rule). Also a ValueError: a bad argument."""
