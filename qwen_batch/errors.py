"""The errors qwen-batch raises. Only the edges (CLI, flows) turn them into messages and exit codes."""


class QwenBatchError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ManifestError(QwenBatchError):
    """The manifest as a whole cannot be used (unreadable, wrong columns, duplicate ids). Nothing was written."""


class StorageError(QwenBatchError):
    """A location could not be read or written."""


class NotFoundError(StorageError):
    """The object or folder does not exist."""


class ModelError(QwenBatchError):
    """A model could not be found or loaded."""


class ConfigError(QwenBatchError):
    """An option has a value that cannot work (device, dtype, batch size...)."""


class InputImageError(QwenBatchError):
    """An input image cannot be used (empty, damaged, not PNG/JPEG/WebP, too large); names the image and the fix."""
