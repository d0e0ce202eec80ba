"""The tiny model as a chat model for generation and server tests (fixtures in conftest.py).

Its final-norm gain is scaled by 4 so logits are peaked (1st-percentile top-2 gap ~0.02): greedy
choices are then far from float ties, and token-level equalities are exact. The tokenizer is a
real byte-level BPE with no merges over the 61-token tiny vocabulary: ids 0-2 are <unk> <s>
</s>, ids 3..60 one character each (CHARS), with a small chat template.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model import transformer as model_lib
from bitnet_jax.tokenizer import Tokenizer, from_gguf_metadata
from bitnet_jax.tokenizer._pretok import bytes_to_unicode

NORM_SCALE = 4.0
CHARS = string.ascii_lowercase + " " + string.ascii_uppercase + ".,!?\n"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}, {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant, {% endif %}")


def char_tokenizer() -> Tokenizer:
    b2u = bytes_to_unicode()
    return from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [b2u[ord(c)] for c in CHARS],
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * len(CHARS),
        "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE})


def peaked(params: dict) -> dict:
    return dict(params, norm=params["norm"] * NORM_SCALE)


def greedy_reference(cfg):
    """run(params, prompt, n, eos=()): the greedy continuation from full forward passes, no
    cache (the ground truth for the engine)."""
    context = cfg.max_position_embeddings
    fwd = jax.jit(lambda p, t: model_lib.forward(p, t, cfg))

    def run(params, prompt, n, eos=()):
        seq = list(prompt)
        out = []
        while len(out) < n and len(seq) < context:
            # Right padding cannot reach back through the causal mask: one compile for all lengths.
            padded = np.zeros((1, context), np.int32)
            padded[0, :len(seq)] = seq
            token = int(np.argmax(fwd(params, jnp.asarray(padded))[0, len(seq) - 1]))
            if token in eos:
                break
            out.append(token)
            seq.append(token)
        return out

    return run
