"""`bitnet_jax.__version__`, read from the installed distribution's metadata.

Its own module so that `import bitnet_jax` does not pay for importlib.metadata (~25 ms, most of
the CLI's start before its Ctrl-C handling is in place); the name is resolved on first use.
"""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("bitnet-jax")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
