"""Shared fixtures and tolerances for the bitnet_jax test-suite (house style §5.5).

Fixture names are stable API for every test file: `tiny_cfg`, `tiny_params`, `tiny_packed_params`,
`tiny_float_cfg`, `tiny_float_params`, `rng`, `shared_data`; module constants `SHARED_DATA`,
`LEAF_TOL`, `MODEL_TOL`, `TINY_CONFIG`, `IN_CI`; helpers `random_packed`, `random_cache`.

In CI (environment variable CI=true) a skip whose reason is a broken build rather than a missing
machine feature (`CI_FATAL_SKIPS`: the CPU FFI extension did not build or load) fails the test.

Tolerances are never relaxed without review (levanter AGENTS.md). BitNet caution: int8 activation
rounding is a step function, so two float paths that differ by one ulp can round a value sitting
at k + 0.5 differently and move a logit by ~1e-2. Comparisons of *different* float paths through
a quantised model therefore either feed identical inputs to each module or use fixtures verified
to be far from such ties; the comments at each test say which.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import tempfile

# The engine turns on JAX's persistent compilation cache; keep the suite's programs out of the
# user's cache (~/.cache/bitnet_jax/xla) unless the caller chose a location.
os.environ.setdefault("BITNET_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="bitnet-jax-test-xla-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare float32 results at 1e-4/1e-5: no TF32 or bf16 passes inside f32 dots
# (matters on GPU; a no-op on CPU).
jax.config.update("jax_default_matmul_precision", "highest")
# Test programs are tiny: XLA compile time dominates, and skipping most optimisation passes
# cuts it by about a third (measured on this suite) without changing any tolerance below. It
# does change float rounding: the tie-free inputs of test_parity_transformers.py (TOKEN_SEED)
# were chosen with it on.
jax.config.update("jax_disable_most_optimizations", True)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY_CONFIG = CONFIGS / "tiny.json"
# ../shared/data beside the checkout (notes/HELPERS.md); tests that need it skip when absent.
SHARED_DATA = ROOT.parent / "shared" / "data"

LEAF_TOL = 1e-5  # max abs error for leaf ops (RMSNorm, RoPE, one BitLinear) in float32
MODEL_TOL = 1e-4  # max abs error on logits of a whole model in float32

# CI services (GitHub Actions, GitLab, ...) set CI=true; .ci/run may too.
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")

# Skip reasons (substrings) that mean the build is broken: outside CI they skip, in CI they fail.
CI_FATAL_SKIPS = ("CPU FFI extension", "SIMDe headers not found")

TINY_SEED = 0
TINY_STD = 0.3  # weights large enough that logits are O(1) and argmax is meaningful


@pytest.fixture
def xla_optimized():
    """XLA's optimisations on for one test, as programs run outside the suite (above they are
    mostly off, which changes XLA's own float rounding: a kernel compared with the XLA ops it
    replaces at tight tolerance is compared with the optimised ones)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()
    yield
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()


def random_packed(rng: np.random.Generator, shape) -> np.ndarray:
    """Packed ternary bytes [..., O/4, I] whose four 2-bit fields are uniform codes in {0, 1, 2}
    (code 3 is invalid: loaders refuse it, bitlinear.py)."""
    packed = np.zeros(shape, np.uint8)
    for j in range(4):
        packed |= rng.integers(0, 3, shape, dtype=np.uint8) << np.uint8(2 * j)
    return packed


def random_cache(rng: np.random.Generator, shape, dtype: str) -> jax.Array:
    """A KV cache array [..., H] of normal values in `dtype`, or for "int8" those values as int8
    rows [..., H + 4] (model/cache.quantize_rows)."""
    values = rng.normal(size=shape)
    if dtype == "int8":
        from bitnet_jax.model.cache import quantize_rows
        return quantize_rows(jnp.asarray(values, jnp.float32))
    return jnp.asarray(values, dtype)


def kernel_paths(all_paths: bool = True) -> list[str]:
    """CPU kernel paths (isa.h) for a test to run under: every one this machine supports, or
    (all_paths=False) the current one and the portable scalar one."""
    from bitnet_jax.kernels.cpu import ffi as cpu_ffi
    return list(cpu_ffi.supported_isas()) if all_paths else sorted({cpu_ffi.isa(), "scalar"})


@contextlib.contextmanager
def kernel_path(isa: str):
    """The CPU kernels run path `isa` inside the block; the previous path is restored after."""
    from bitnet_jax.kernels.cpu import ffi as cpu_ffi
    previous = cpu_ffi.isa()
    cpu_ffi.set_isa(isa)
    try:
        yield
    finally:
        cpu_ffi.set_isa(previous)


def require_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is absent (shared test data lives beside "
                    "the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder; skips the test when it is absent."""
    return require_shared()


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh NumPy generator with a fixed seed (per test, so tests do not couple)."""
    return np.random.default_rng(1234)


def _tiny_params(cfg, seed: int):
    """Latent float32 params in the `params.param_shapes` layout, drawn with NumPy.

    Weights are N(0, TINY_STD²) and norm gains 1 + N(0, 0.2²), so a swapped norm changes the
    output. NumPy keeps fixture set-up instant (each new shape of jax.random compiles).
    """
    from bitnet_jax.model.params import param_shapes

    gen = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))
    out = []
    for path, shape in flat:
        if "norm" in jax.tree_util.keystr(path):
            leaf = 1.0 + 0.2 * gen.standard_normal(shape)
        else:
            leaf = TINY_STD * gen.standard_normal(shape)
        out.append(jnp.asarray(leaf, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="session")
def tiny_cfg():
    """configs/tiny.json: V=61 D=32 F=48 N=4 K=2 H=8 L=2, relu², sub-norms, tied, BitNet."""
    from bitnet_jax.model.config import load_config

    return load_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Latent float32 params of `tiny_cfg` (NumPy seed 0, weights N(0, 0.3²), gains 1 ± 0.2)."""
    return _tiny_params(tiny_cfg, TINY_SEED)


@pytest.fixture(scope="session")
def tiny_packed_params(tiny_cfg, tiny_params):
    """`tiny_params` with every BitLinear leaf ternarised and packed ({"packed", "scale"})."""
    from bitnet_jax.model.params import pack_params

    return pack_params(tiny_params, tiny_cfg)


@pytest.fixture(scope="session")
def chat_model(tiny_cfg, tiny_packed_params):
    """The tiny packed model with peaked logits and a character tokenizer (tiny_chat.py)."""
    from bitnet_jax.formats.base import Model
    from tiny_chat import char_tokenizer, peaked

    return Model(tiny_cfg, peaked(tiny_packed_params), char_tokenizer())


@pytest.fixture(scope="session")
def greedy_reference(tiny_cfg):
    """run(params, prompt, n, eos=()): greedy tokens from uncached forward passes."""
    from tiny_chat import greedy_reference as build

    return build(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_float_cfg(tiny_cfg):
    """The tiny shapes as a plain float Llama (no quantisation, no sub-norms, SiLU)."""
    return tiny_cfg.replace(quant_method=None, use_sub_norms=False, hidden_act="silu",
                            architecture="LlamaForCausalLM", model_type="llama",
                            linear_class="bitlinear", quantization_mode="online")  # = from_hf


@pytest.fixture(scope="session")
def tiny_float_params(tiny_float_cfg):
    """Float32 params of `tiny_float_cfg` (seed 0, as `tiny_params`)."""
    return _tiny_params(tiny_float_cfg, TINY_SEED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CI=true, turn a skip for a CI_FATAL_SKIPS reason into a failure (any test file)."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if any(marker in reason for marker in CI_FATAL_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"CI=true, so this skip is a failure: {reason}"


def pytest_report_header(config):
    return [f"jax {jax.__version__} backend={jax.default_backend()} "
            f"shared_data={'present' if SHARED_DATA.exists() else 'absent'} "
            f"cores={os.cpu_count()} ci={IN_CI}"]
