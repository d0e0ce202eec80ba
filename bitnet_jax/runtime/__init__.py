"""Running a model: where (placement), the jitted programs (engine), the slot scheduler, generate.

  placement.py      backend / device / policy resolution, parameter placement
  memory.py         do params + KV cache + temporaries fit the device? clear errors when not
  compile_cache.py  JAX's persistent compilation cache
  sampling.py       SamplingParams and the in-graph sampler
  engine.py         slot decode state, prefill-into-a-slot, the chunked decode loop, buckets
  scheduler.py      Engine: request queue, decode slots, the step loop (continuous batching)
  runner.py         the Engine's device side: state placement, programs, memory checks
  handle.py         Handle / Event: what a caller holds for one submitted request
  request.py        prompts to validated token ids
  generate.py       generate / stream / warmup on the Engine
  detokenize.py     per-sequence text: incremental decoding and stop strings
  benchmark.py      prefill and decode throughput
"""

from bitnet_jax.runtime.generate import Result, generate, stream, warmup
from bitnet_jax.runtime.sampling import SamplingParams

__all__ = ["Result", "SamplingParams", "generate", "stream", "warmup"]
