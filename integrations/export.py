"""FP8 checkpoints in transformers' own fine-grained FP8 format (what vLLM and transformers serve).

Format, as ``transformers.integrations.finegrained_fp8`` reads it:

- every quantized linear layer ``<name>`` stores ``<name>.weight`` as ``float8_e4m3fn`` (N, K)
  and ``<name>.weight_scale_inv`` as FP32 (ceil(N/128), ceil(K/128)): each 128x128 block of
  the weight is ``fp8 * weight_scale_inv[block]``;
- ``config.json`` carries ``quantization_config = {"quant_method": "fp8", "activation_scheme":
  "dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": [...]}``: layers
  listed there (lm_head here) keep their high-precision weights.

Block scales follow the loader's own quantizer: ``scale_inv = amax(block) / 448`` (1 for an
all-zero block). :func:`load_fp8` reads such a checkpoint on any machine (dequantizing on
the CPU) into a trainable model and converts it for FP8 training again.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

__all__ = ["save_fp8", "load_fp8", "quantize_blockwise", "dequantize_blockwise"]

BLOCK = 128
_E4M3 = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(_E4M3).max)


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (FP8 (N, K), FP32 scale_inv (ceil(N/b), ceil(K/b))); partial edge blocks allowed."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w.float()
    tiles = padded.view(nb, block, kb, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, _E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = (tiles * scale[:, None, :, None]).clamp(-_E4M3_MAX, _E4M3_MAX).to(_E4M3)
    return q.view(nb * block, kb * block)[:N, :K].contiguous(), (1.0 / scale).to(torch.float32)


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: int = BLOCK
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` (in FP32, then one rounding to ``dtype``)."""
    N, K = q.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:N].repeat_interleave(block, 1)[:, :K]
    return (q.float() * s).to(dtype)


def _linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def save_fp8(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    keep: tuple[str, ...] = ("lm_head",),
    state_dict: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write ``model`` as an FP8 checkpoint transformers' FP8 loader understands. Returns the directory.

    Args:
        model: an HF causal LM (converted by hf_fp8 or not).
        keep: module names left in the model's own dtype (``modules_to_not_convert``).
        state_dict: the full state dict to write instead of ``model.state_dict()`` (a sharded
            model's, gathered; see :func:`hf_fp8.distributed.save_fp8_consolidated`).
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = model.config
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v for k, v in source.items() if not k.endswith((".fp8_amax_history", ".fp8_scale"))}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the loader re-ties it
    quantized: list[str] = []
    not_converted = list(keep)
    for name in _linear_weights(model):
        if any(name == k or name.endswith("." + k) for k in keep) or f"{name}.weight" not in state:
            continue
        q, s = quantize_blockwise(state[f"{name}.weight"])  # dequantized already for FP8-only weights
        state[f"{name}.weight"] = q
        state[f"{name}.weight_scale_inv"] = s
        quantized.append(name)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": not_converted,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    return str(directory)


def load_fp8(
    directory: str | os.PathLike,
    fp8_config=None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
):
    """Read an FP8 checkpoint (ours or any in this format) into a trainable model.

    Weights are dequantized on ``device`` (CPU by default: no GPU needed) into ``dtype``; then
    the model is converted with ``fp8_config`` (an :class:`hf_fp8.Fp8Config`, a recipe name, or
    ``None`` to leave it unconverted). Returns ``(model, report)``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        raise ValueError(f"load_fp8: {directory} has no quantization_config; load it with from_pretrained")
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if qcfg.get("quant_method") != "fp8":
        raise ValueError(f"load_fp8: quant_method is {qcfg.get('quant_method')!r}, expected 'fp8'")
    block = (qcfg.get("weight_block_size") or [BLOCK, BLOCK])[0]
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    raw = load_file(os.path.join(directory, "model.safetensors"), device=str(device))
    state = {}
    for key, value in raw.items():
        if key.endswith(".weight_scale_inv"):
            continue
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else None
        if scale_key in raw:
            state[key] = dequantize_blockwise(value, raw[scale_key], dtype, block)
        else:
            state[key] = value.to(dtype) if value.is_floating_point() else value
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))
    ]
    if missing or result.unexpected_keys:
        raise ValueError(f"load_fp8: missing keys {missing}, unexpected keys {result.unexpected_keys}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    report = None
    if fp8_config is not None:
        from hf_fp8.convert import convert

        report = convert(model, fp8_config)
    return model, report
