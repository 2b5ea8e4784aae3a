"""Load published FP8 checkpoints for fine-tuning, keeping their FP8 weights as stored.

Two formats, as vendors publish them:

- transformers' fine-grained FP8 (``quantization_config.quant_method == "fp8"``, the Qwen3 and
  DeepSeek "-FP8" releases): E4M3 ``weight`` codes with ``weight_scale_inv`` per block of
  ``weight_block_size = [rows, cols]`` (any block shape; per tensor without one), modules in
  ``modules_to_not_convert`` left in high precision;
- compressed-tensors FP8 (``quant_method == "compressed-tensors"``, ``float-quantized``):
  ``weight`` codes with ``weight_scale`` per tensor, per output channel or per block (the
  ``strategy`` of its ``config_groups``), modules in ``ignore`` left as they are.

Each quantized linear becomes a :class:`hf_fp8.frozen_fp8.FrozenFp8Linear` holding the codes and
scales exactly as read (one byte per weight, frozen); everything else loads in ``dtype``. Then
:func:`hf_fp8.convert` applies ``fp8_config`` to the rest (FP32 RoPE and loss, fused ops, FP8
for any other linear it selects). The result trains LoRA adapters with PEFT.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

__all__ = ["from_pretrained", "published_fp8_layout"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def published_fp8_layout(qcfg: dict) -> tuple[str, tuple[int, int] | None]:
    """(scale tensor suffix, weight block or None) of a checkpoint's ``quantization_config``; a
    ``ValueError`` naming what is not FP8 weight quantization. (Which modules are quantized is
    read from the tensors: a weight stored in FP8 with a scale beside it.)"""
    method = qcfg.get("quant_method")
    if method == "fp8":
        block = qcfg.get("weight_block_size")
        if block is not None and (len(block) != 2 or not all(int(b) > 0 for b in block)):
            raise ValueError(f"weight_block_size must be [rows, cols] > 0, got {block!r}")
        return "weight_scale_inv", None if block is None else (int(block[0]), int(block[1]))
    if method == "compressed-tensors":
        groups = qcfg.get("config_groups") or {}
        layouts = set()
        for name, group in groups.items():
            w = group.get("weights") or {}
            if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
                raise ValueError(f"compressed-tensors group {name!r}: weights {w!r} are not 8-bit float (FP8)")
            strategy = w.get("strategy")
            if strategy == "block":
                b = w.get("block_structure")
                layouts.add((int(b[0]), int(b[1])))
            elif strategy in ("tensor", "channel"):
                layouts.add(None)
            else:
                raise ValueError(
                    f"compressed-tensors group {name!r}: weight strategy {strategy!r} (tensor, channel, block)"
                )
        if len(layouts) > 1:
            raise ValueError(f"compressed-tensors: groups with different block layouts {sorted(map(str, layouts))}")
        return "weight_scale", next(iter(layouts), None)
    raise ValueError(f"quant_method {method!r} is not an FP8 checkpoint format (fp8, compressed-tensors)")


def from_pretrained(
    path: str | os.PathLike,
    fp8_config=None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
):
    """Load a published FP8 checkpoint (local folder or Hub id) for fine-tuning: its quantized
    linears keep the stored FP8 codes and scales, frozen (:class:`~hf_fp8.frozen_fp8.FrozenFp8Linear`),
    the rest loads in ``dtype`` on ``device``; then :func:`hf_fp8.convert` with ``fp8_config``
    (an ``Fp8Config`` or a recipe name; default ``Fp8Config()``). With the ``"blockwise"`` recipe
    the frozen layers stored in 128x128 blocks also compute in FP8: their GEMMs read the codes
    with the block scales and take the activations in 1x128 E4M3 tiles, as the checkpoint is
    served; otherwise they compute on the weights dequantized on the fly, activations in
    ``dtype``. Returns ``(model, report)``. Train adapters on it with PEFT
    (``peft.get_peft_model``); ``merge_and_unload()`` gives high-precision merged weights.

    Raises:
        FileNotFoundError: not a checkpoint folder, or a shard it lists is missing.
        ValueError: not an FP8 checkpoint; a scale whose shape fits no layout; missing or unused keys.
    """
    from transformers import AutoModelForCausalLM

    from hf_fp8.frozen_fp8 import FrozenFp8Linear
    from hf_fp8.integrations.export import _quantized_config, _read_checkpoint_tensors

    directory, config, qcfg = _quantized_config(path, "from_pretrained")
    try:
        scale_suffix, block = published_fp8_layout(qcfg)
    except ValueError as e:
        raise ValueError(f"from_pretrained: {directory}: {e}") from None
    if qcfg.get("quant_method") == "compressed-tensors":
        acts = [g.get("input_activations") for g in (qcfg.get("config_groups") or {}).values()]
        if any(a and not a.get("dynamic", True) for a in acts):
            warnings.warn(
                "from_pretrained: the checkpoint's static activation scales (input_scale) are not used: "
                "adapters train on the dequantized weights with activations in high precision",
                UserWarning,
                stacklevel=2,
            )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    raw = _read_checkpoint_tensors(directory, "from_pretrained")
    state, frozen = {}, {}
    for key, value in raw.items():
        if key.endswith((".weight_scale_inv", ".weight_scale", ".input_scale")):
            continue
        module_name = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = raw.get(f"{module_name}.{scale_suffix}") if module_name else None
        if scale is not None and value.dtype in _FP8:
            frozen[module_name] = (value, scale)
        else:
            state[key] = value.to(dtype=dtype) if value.is_floating_point() else value
    for name, (codes, scale) in frozen.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"from_pretrained: the checkpoint quantizes {name}, which the model does not have"
            ) from None
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(codes.shape):
            raise ValueError(f"from_pretrained: {name}: FP8 weight {tuple(codes.shape)} for {linear}")
        bias = state.pop(f"{name}.bias", None)
        try:
            new = FrozenFp8Linear(codes.to(device), scale.to(device), block, bias=bias, compute_dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"from_pretrained: {name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    state = {k: v.to(device) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and tied)]
    missing = [k for k in missing if k.rpartition(".")[0] not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"from_pretrained: missing keys {missing}, unexpected keys {result.unexpected_keys}")
    if tied:
        model.tie_weights()
    for owner in model.modules():  # non-persistent buffers, built on meta (RoPE's): rebuild them
        for bname, buf in list(owner._buffers.items()):
            if buf is not None and buf.is_meta:
                _rebuild_buffer(owner, bname, device)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"from_pretrained: not in the checkpoint: {still_meta[:5]}")
    return model, prepare_frozen_fp8_model(model, fp8_config)


def prepare_frozen_fp8_model(model: nn.Module, fp8_config=None):
    """What :func:`from_pretrained` does once the checkpoint is loaded, for a model whose quantized
    linears are :class:`~hf_fp8.frozen_fp8.FrozenFp8Linear`: everything else trainable, the frozen
    layers frozen, :func:`hf_fp8.convert` with ``fp8_config`` (an ``Fp8Config`` or a recipe name;
    default ``Fp8Config()``), blockwise FP8 GEMMs on the frozen layers' codes under the
    ``"blockwise"`` recipe, and LoRA merges that dequantize first. Returns the report.
    (bench_lora builds its block-FP8 model in memory and calls this, so it measures what users run.)"""
    import hf_fp8
    from hf_fp8.config import Recipe
    from hf_fp8.frozen_fp8 import FrozenFp8Linear, fp8_gemm_layout

    layers = [m for m in model.modules() if isinstance(m, FrozenFp8Linear)]
    model.requires_grad_(True)
    for m in layers:
        m.weight.requires_grad_(False)
        if m.bias is not None:
            m.bias.requires_grad_(False)
    fp8_config = hf_fp8.Fp8Config() if fp8_config is None else fp8_config
    if isinstance(fp8_config, str):
        fp8_config = hf_fp8.Fp8Config(recipe=fp8_config)
    report = hf_fp8.convert(model, fp8_config)
    if layers and fp8_config.recipe is Recipe.BLOCKWISE:  # the frozen layers' GEMMs in FP8 too
        for m in layers:
            m.fp8_gemm = fp8_gemm_layout(m)
        gemm = sum(m.fp8_gemm for m in layers)
        report.notes.append(
            f"{gemm} of {len(layers)} frozen layers run blockwise FP8 GEMMs on their codes"
            + ("" if gemm == len(layers) else " (the others: not 128x128 E4M3 blocks; they dequantize)")
        )
    if layers:
        from hf_fp8.integrations.lora import enable_peft_fp8_weights

        enable_peft_fp8_weights()  # LoRA merges over these layers dequantize the base first
    report.notes.append(f"{len(layers)} linear layers keep the checkpoint's FP8 codes and scales (frozen)")
    return report


def _rebuild_buffer(module: nn.Module, name: str, device) -> None:
    """A non-persistent buffer left on the meta device (not in the checkpoint): HF's rotary
    embeddings rebuild ``inv_freq`` from their config."""
    if name in ("inv_freq", "original_inv_freq") and hasattr(module, "config"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope_type = getattr(module, "rope_type", "default")
        fn = getattr(type(module), "compute_default_rope_parameters", None) if rope_type == "default" else None
        fn = fn or ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, _ = fn(module.config)
        module._buffers[name] = inv_freq.to(device)
        return
    raise ValueError(f"from_pretrained: {type(module).__name__}.{name} is not in the checkpoint and cannot be rebuilt")
