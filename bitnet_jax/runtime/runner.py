"""The serving engine's device side: where its state lives, its programs, memory, host reads.

A `Runner` holds the decode state of one Engine (scheduler.py) on one device, or sharded over a
mesh when the model's params are (model/sharding.py: the state by its rules, inputs and the
outputs the host reads replicated). It compiles the engine's programs (engine.py) ahead of time
for the engine's (B, S), checks before anything is allocated that params + KV cache + the
largest program's temporaries fit the device (memory.py), and turns an out-of-memory while
compiling or running into the same clear error.
"""

from __future__ import annotations

import time

import jax

from bitnet_jax.model import sharding
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy
from bitnet_jax.runtime import engine, memory
from bitnet_jax.runtime.placement import ensure_on_device


class Runner:
    """The device half of one Engine.

    Args:
      cfg, policy: the model config and the resolved precision policy.
      params: the placed params (on `device`, or sharded over a mesh).
      device: the device (the first of the mesh for a sharded model).
      slots, context: decode slots B and cache length S.
      eos_width: E, the stop ids per slot.
    """

    def __init__(self, cfg: ModelConfig, policy: Policy, params: dict, device, *, slots: int,
                 context: int, eos_width: int):
        self.cfg, self.policy, self.params, self.device = cfg, policy, params, device
        self.slots, self.context, self.eos_width = slots, context, eos_width
        self.mesh = sharding.mesh_of(params)
        self.where = sharding.replicated(self.mesh) if self.mesh is not None else device
        self.state_shardings = None if self.mesh is None else sharding.state_shardings(
            self.mesh, engine.state_shape(cfg, policy, slots, context, eos_width))
        self.static = {"cfg": cfg, "policy": policy}
        self.params_bytes = memory.tree_bytes(params)
        self.temp_bytes = 0  # the largest compiled program's temporaries so far
        self.compile_s = 0.0
        self.state = None
        self._check_fit()

    def _check_fit(self) -> None:
        if self.mesh is None:  # per-device accounting of a sharded state is not done here
            memory.check_fit(self.cfg, self.policy, params_bytes=self.params_bytes,
                             slots=self.slots, context=self.context, device=self.device,
                             temp_bytes=self.temp_bytes, params_on_device=True)

    def memory_errors(self):
        """An out-of-memory inside becomes a DeviceError saying what would fit (memory.py)."""
        return memory.memory_errors(self.cfg, self.policy, slots=self.slots,
                                    context=self.context, device=self.device,
                                    params_bytes=self.params_bytes, temp_bytes=self.temp_bytes)

    def ensure_state(self) -> dict:
        """The decode state, allocated where it lives on first use."""
        if self.state is None:
            with self.memory_errors():
                self.state = engine.new_state(self.cfg, self.slots, self.context,
                                              self.policy.kv_cache, self.eos_width, self.device,
                                              self.state_shardings)
        return self.state

    def put(self, tree):
        """Host inputs of one call, where the programs take them."""
        return ensure_on_device(tree, self.where)

    def host(self, tree):
        """Device values as numpy, whole, on every process (also for a multi-host mesh)."""
        if self.mesh is None:
            return jax.device_get(tree)
        return jax.tree.map(sharding.host_value, tree)

    def _out_shardings(self):
        return None if self.mesh is None else (self.state_shardings, self.where)

    def compiled(self, fn, args: tuple, static: dict) -> tuple[object, float]:
        """engine.compiled for this runner's placement; a new program's temporaries are added
        to the memory check while the state is not yet allocated."""
        with self.memory_errors():
            exe, seconds = engine.compiled(fn, args, static, self.where, self._out_shardings())
        if seconds:
            self.compile_s += seconds
            analysis = exe.memory_analysis()
            temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
            if temp > self.temp_bytes:
                self.temp_bytes = temp
                if self.state is None:
                    self._check_fit()
        return exe, seconds

    def call(self, fn, args: tuple, static: dict) -> tuple[object, float, float]:
        """Run `fn` (compiling it first if needed); (result, run seconds, compile seconds).

        The state (args[1]) is donated: the caller keeps the returned one.
        """
        exe, seconds = self.compiled(fn, args, static)
        t0 = time.perf_counter()
        with self.memory_errors():
            result = exe(*args)
            jax.block_until_ready(result)
        return result, time.perf_counter() - t0, seconds

    def warmup(self, prompt_lengths, logprobs: bool) -> float:
        """Compile the prefill chunks prompts of these lengths use and every decode program;
        returns the seconds spent compiling."""
        chunks = sorted({t for n in prompt_lengths
                         for _, t in engine.prefill_plan(min(int(n), self.context), self.context)})
        total = sum(self._compile(engine.prefill, "prefill", chunk=t)[1] for t in chunks)
        for lp in (False, True) if logprobs else (False,):
            for rows in (b for b in engine.BATCH_BUCKETS if b <= self.slots):
                total += self._compile(engine.decode, "decode", chunk=chunks[0], logprobs=lp,
                                       rows=rows)[1]
        return total

    def _compile(self, fn, name: str, **kw):
        programs = engine.program_args(self.params, self.cfg, self.policy, slots=self.slots,
                                       context=self.context, eos_width=self.eos_width,
                                       device=self.where, state_shardings=self.state_shardings,
                                       **kw)
        return self.compiled(fn, *programs[name])
