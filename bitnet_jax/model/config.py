"""Model configuration: a frozen, hashable dataclass built from Hugging Face `config.json`.

Field names are Hugging Face's, so `from_hf` is a filter plus validation. Three things are ours,
derived from the HF file: `use_sub_norms` (BitNet's attn_sub_norm / ffn_sub_norm, spec §1.7),
and the flattened `quantization_config` (`quant_method`, `linear_class`, `quantization_mode`).

Variants, chosen by data (spec §1.7):
  2B4T (BitNetForCausalLM)      relu² gated FFN, sub-norms, tied embeddings
  1bitLLM (BitnetForCausalLM)   SiLU gated FFN, sub-norms, tied embeddings
  ternary Llama (Falcon3, Llama3-8B-1.58; LlamaForCausalLM + quant_method bitnet): no sub-norms
  float Llama (LlamaForCausalLM, no quantization_config): plain float weights, no quantisation
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from bitnet_jax.errors import ConfigError

BITNET_ARCHS = ("BitNetForCausalLM", "BitnetForCausalLM")
LLAMA_ARCHS = ("LlamaForCausalLM",)
ACTIVATIONS = ("silu", "relu2")

# HF keys we read into fields of the same name.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "hidden_act", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "model_type",
)
# HF keys that carry no information for the forward pass (or that we check separately).
_HF_IGNORED = {
    "architectures", "quantization_config", "torch_dtype", "dtype", "transformers_version",
    "initializer_range", "use_cache", "attention_dropout", "pretraining_tp", "input_bits",
    "weight_bits", "auto_map", "_name_or_path", "rope_interleaved", "mlp_bias", "attention_bias",
    "rope_scaling", "is_bitnet_config", "_attn_implementation_autoset", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "bad_words_ids", "max_length",
    "generation_config", "rope_parameters", "layer_types", "sliding_window", "use_sliding_window",
    # PretrainedConfig bookkeeping that every HF config.json may carry.
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "add_cross_attention",
    "is_decoder", "is_encoder_decoder", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "torchscript", "pruned_heads", "cross_attention_hidden_size",
    "decoder_start_token_id", "sep_token_id", "tf_legacy_loss", "use_bfloat16",
    "_commit_hash", "_comment",
}
_WARNED_UNKNOWN: set[frozenset] = set()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one model (static under jit). Letters as in model.py: V D F L N K H."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"
    use_sub_norms: bool = False
    quant_method: str | None = "bitnet"
    linear_class: str = "bitlinear"
    quantization_mode: str = "offline"

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.head_dim is None:
            if self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """G: query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def quantized(self) -> bool:
        """True for BitNet (ternary BitLinear) models, False for plain float Llama."""
        return self.quant_method == "bitnet"

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name}={value!r} must be a positive integer.")
        if self.head_dim is None or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(
                f"config field head_dim={self.head_dim!r} must be a positive integer "
                "(or hidden_size divisible by num_attention_heads)."
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field head_dim={self.head_dim} must be even for RoPE.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"config field hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{ACTIVATIONS}."
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ConfigError(f"config field rms_norm_eps={self.rms_norm_eps!r} must be in (0, 1).")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"config field rope_theta={self.rope_theta!r} must be positive.")
        if self.quant_method not in (None, "bitnet"):
            raise ConfigError(
                f"config field quantization_config.quant_method={self.quant_method!r} is not "
                "supported; bitnet_jax runs BitNet ('bitnet') and float Llama models."
            )
        if self.linear_class not in ("bitlinear", "autobitlinear"):
            raise ConfigError(
                f"config field quantization_config.linear_class={self.linear_class!r} is unknown; "
                "expected 'bitlinear' or 'autobitlinear'."
            )
        if self.quantization_mode not in ("online", "offline"):
            raise ConfigError(
                f"config field quantization_config.quantization_mode={self.quantization_mode!r} "
                "is unknown; expected 'online' or 'offline'."
            )
        if self.use_sub_norms and self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ConfigError(
                "config fields num_attention_heads*head_dim must equal hidden_size for BitNet "
                "models (attn_sub_norm has width hidden_size)."
            )
        if self.quantized:
            for name, dim in (("hidden_size", self.hidden_size),
                              ("intermediate_size", self.intermediate_size),
                              ("num_key_value_heads*head_dim",
                               self.num_key_value_heads * self.head_dim)):
                if dim % 4:
                    raise ConfigError(
                        f"config field {name}={dim} must be a multiple of 4 for 2-bit packing."
                    )
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value):
                raise ConfigError(f"config field {name}={value!r} must be a token id or null.")
        for value in self.eos_ids:
            if not (isinstance(value, int) and value >= 0):
                raise ConfigError(f"config field eos_token_id={self.eos_token_id!r} must hold ids.")

    # ---- conversion ----------------------------------------------------------------------
    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict[str, Any]:
        """HF `config.json` dict for this config (inverse of `from_hf`)."""
        out: dict[str, Any] = {"architectures": [self.architecture]}
        for name in _HF_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        if self.quantized:
            out["quantization_config"] = {
                "quant_method": "bitnet",
                "linear_class": self.linear_class,
                "quantization_mode": self.quantization_mode,
            }
        return out


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict, refusing what we cannot run."""
    if not isinstance(hf, dict):
        raise ConfigError("config.json must hold a JSON object.")
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    arch = archs[0] if archs else None
    if arch is None:
        model_type = hf.get("model_type")
        arch = {"bitnet": "BitNetForCausalLM", "llama": "LlamaForCausalLM"}.get(model_type)
    if arch not in BITNET_ARCHS + LLAMA_ARCHS:
        raise ConfigError(
            f"config field architectures={archs!r} is not supported; bitnet_jax runs "
            f"{', '.join(BITNET_ARCHS + LLAMA_ARCHS)}."
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("config field attention_bias/mlp_bias=true is not supported (no biases).")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ConfigError(f"config field rope_scaling={rope_scaling!r} must be an object or null.")
    if rope_scaling and not (
        rope_scaling.get("type", rope_scaling.get("rope_type")) in ("linear", "default")
        and float(rope_scaling.get("factor", 1.0)) == 1.0
    ):
        raise ConfigError(f"config field rope_scaling={rope_scaling!r} is not supported.")
    # transformers >= 5 writes {"rope_parameters": {"rope_type", "rope_theta"}} instead of a
    # top-level rope_theta; reading only the latter silently fell back to θ = 10000.
    rope_parameters = hf.get("rope_parameters")
    if isinstance(rope_parameters, dict):
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type not in ("default", "linear") or float(
                rope_parameters.get("factor", 1.0)) != 1.0:
            raise ConfigError(f"config field rope_parameters={rope_parameters!r} is not supported.")
        if hf.get("rope_theta") is None and rope_parameters.get("rope_theta") is not None:
            hf = {**hf, "rope_theta": rope_parameters["rope_theta"]}
    _warn_unknown_keys(hf)
    qc = hf.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ConfigError("config field quantization_config must be an object.")
    is_bitnet_arch = arch in BITNET_ARCHS
    quant_method = qc.get("quant_method")
    if is_bitnet_arch and quant_method is None:
        quant_method = "bitnet"  # 1bitLLM / -bf16 checkpoints: latent weights, no config block
    # Packed checkpoints carry a quantization_config; 1bitLLM's latent ones carry none.
    mode = qc.get("quantization_mode") or (
        "offline" if qc.get("offline_quantization", bool(qc)) else "online")
    kwargs = {name: hf[name] for name in _HF_FIELDS if name in hf and hf[name] is not None}
    if "hidden_act" not in kwargs and arch == "BitNetForCausalLM":
        kwargs["hidden_act"] = "relu2"
    if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if n not in kwargs]
    if missing:
        raise ConfigError(f"config field {missing[0]} is missing from config.json.")
    if "tie_word_embeddings" not in kwargs:
        # HF's default is True for PretrainedConfig; BitNetConfig/LlamaConfig default False,
        # but 1bitLLM checkpoints omit it and ship no lm_head (spec §1.4).
        kwargs["tie_word_embeddings"] = arch == "BitnetForCausalLM"
    return ModelConfig(
        **kwargs,
        architecture=arch,
        use_sub_norms=is_bitnet_arch,
        quant_method=quant_method,
        linear_class=qc.get("linear_class", "bitlinear"),
        quantization_mode=mode,
    )


def _warn_unknown_keys(hf: dict[str, Any]) -> None:
    """Warn once per set of config.json keys that bitnet_jax neither reads nor knows to ignore."""
    unknown = frozenset(k for k in hf if k not in _HF_FIELDS and k not in _HF_IGNORED)
    if unknown and unknown not in _WARNED_UNKNOWN:
        _WARNED_UNKNOWN.add(unknown)
        warnings.warn(f"config.json keys {sorted(unknown)} are not used by bitnet_jax; if one "
                      "changes the model's math, its outputs will differ from transformers'.",
                      stacklevel=3)


def _preset(name: str) -> Path | None:
    """configs/<name>.json: shipped in the wheel as bitnet_jax/configs/ (setup.py), or the
    repository's configs/ folder in a checkout or editable install."""
    here = Path(__file__).resolve()
    for folder in (here.parents[1] / "configs", here.parents[2] / "configs"):
        if (folder / f"{name}.json").is_file():
            return folder / f"{name}.json"
    return None


def load_config(path: str | Path) -> ModelConfig:
    """Read a config.json file (or a directory holding one, or a configs/ preset name)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        preset = _preset(path.name) if not path.suffix else None
        if preset is not None:
            path = preset
        else:
            raise ConfigError(f"config file {path} does not exist.")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON ({exc}).") from None
    return from_hf(hf)
