"""JAX's persistent compilation cache, turned on the first time the engine compiles.

Never at import (house-style §5.3 rule 3). Its minimum compile time is 0, since the default of
1 s leaves the cache empty for most programs (jax-notes §6.2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax

_CACHE_STATE: dict[str, Path | None] = {}


def compilation_cache_dir() -> Path | None:
    """Where compiled programs are kept between runs, or None when caching is turned off.

    BITNET_JAX_NO_CACHE=1 turns it off; BITNET_JAX_CACHE_DIR sets the folder; otherwise the
    user cache folder (platformdirs convention): $XDG_CACHE_HOME or ~/.cache on Linux,
    ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows, plus bitnet_jax/xla.
    """
    if os.environ.get("BITNET_JAX_NO_CACHE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    explicit = os.environ.get("BITNET_JAX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bitnet_jax" / "xla"


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache once per process (called by the engine).

    A cache folder the user already configured through jax.config is left alone.

    Returns:
      The cache folder in use, or None when caching is off.
    """
    if "dir" in _CACHE_STATE:
        return _CACHE_STATE["dir"]
    configured = jax.config.jax_compilation_cache_dir
    path = Path(configured) if configured else compilation_cache_dir()
    if path is not None and not configured:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home: run without the cache rather than fail
            path = None
        else:
            jax.config.update("jax_compilation_cache_dir", str(path))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _CACHE_STATE["dir"] = path
    return path
