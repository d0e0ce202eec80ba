"""Running a model: where (placement), the jitted programs (engine), the host loop (generate).

  placement.py      backend / device / policy resolution, parameter placement
  compile_cache.py  JAX's persistent compilation cache
  sampling.py       SamplingParams and the in-graph sampler
  engine.py         decode state, prefill, the chunked decode loop, shape buckets
  generate.py       generate / stream / warmup: the host loop around the engine
  detokenize.py     per-sequence text: incremental decoding and stop strings
  benchmark.py      prefill and decode throughput
"""

from bitnet_jax.runtime.generate import Result, generate, stream, warmup
from bitnet_jax.runtime.sampling import SamplingParams

__all__ = ["Result", "SamplingParams", "generate", "stream", "warmup"]
