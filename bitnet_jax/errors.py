"""The one exception family users see.

Every error a user can cause (a bad path, a malformed file, an unsupported option) is raised as
a subclass of `BitNetError` carrying one clear sentence that names the problem and the fix. The
CLI prints that sentence and exits non-zero, never a traceback.

When the fix is an option that the Python API and the CLI spell differently (`truncate=True` vs
`--truncate`), the error also carries `cli_message`, the same sentence in CLI words, which the
CLI prints instead.
"""


class BitNetError(Exception):
    """Base class of every user-facing bitnet_jax error.

    Attributes:
      cli_message: the message in the command line's words, or None when str(self) fits both.
    """

    def __init__(self, *args, cli_message: str | None = None):
        super().__init__(*args)
        self.cli_message = cli_message


class ConfigError(BitNetError, ValueError):
    """A model or run config is invalid (the message names the field)."""


class CheckpointError(BitNetError):
    """A checkpoint directory or file cannot be read (missing, truncated, unknown tensors)."""


class GGUFError(CheckpointError):
    """A GGUF file is malformed or uses a layout we do not support."""


class TokenizerError(BitNetError):
    """A tokenizer file is missing, malformed or asked to decode ids it does not have."""


class DeviceError(BitNetError):
    """The requested backend is unavailable or the model does not fit on it."""


class GenerationError(BitNetError):
    """A generation request is invalid (ids outside the vocabulary, prompt too long, NaN logits)."""


class KernelError(BitNetError, ValueError):
    """A packed-kernel call is invalid (bad shapes or dtypes) or the kernel is not built."""
