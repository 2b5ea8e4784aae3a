"""Model conversion: swap ``nn.Linear`` for ``Fp8Linear`` in place, and back.

The swap keeps the same ``nn.Parameter`` objects, so an optimizer built before or after
still updates the right tensors, and a converted model's ``state_dict`` has the same
parameter keys. The filter is built once from the root model (so "the output embedding"
means the model's, not whatever module is being visited) and every decision is recorded
in a :class:`ConversionReport`.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from hf_fp8.config import Fp8Config, Recipe
from hf_fp8.filter import input_sharing_siblings, passes_shape_rule
from hf_fp8.linear import Fp8Linear
from hf_fp8.report import ConversionReport, ModuleDecision

__all__ = ["convert", "revert", "nonfinite_modules", "reset_nonfinite"]

logger = logging.getLogger(__name__)

ModuleFilter = Callable[[nn.Module, str], bool]


def _output_embedding_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            ids.add(id(out))
    return ids


def _embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _decide(
    name: str,
    module: nn.Linear,
    config: Fp8Config,
    output_embeddings: set[int],
    embedding_weights: set[int],
    module_filter_fn: ModuleFilter | None,
    shape_rule: bool = True,
) -> tuple[bool, str]:
    K, N = module.in_features, module.out_features
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return False, f"excluded by pattern {pattern!r}"
    if config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return False, "not matched by the include patterns"
    if ".lora_" in f".{name}" or name.startswith("lora_"):
        return False, "LoRA adapter: kept in its own precision"
    if getattr(module, "has_fp8_weight", False) and type(module).__name__ == "FrozenFp8Linear":
        return False, "frozen FP8 weights of a published checkpoint (its codes and scales, kept)"
    if type(module) is not nn.Linear:
        return False, f"{type(module).__name__} is an nn.Linear subclass with its own behaviour"
    # the output embedding stays in high precision whatever the auto filter says, unless an
    # include pattern names it: auto_filter=False drops the size rule, not the accuracy rule
    named = any(fnmatch.fnmatchcase(name, p) and p not in _MATCH_ALL for p in config.include)
    if not named:
        if id(module) in output_embeddings or name.split(".")[-1] == "lm_head":
            return False, "output embedding (include names it to convert)"
        if id(module.weight) in embedding_weights:
            return False, "weight tied to an embedding (include names it to convert)"
    if K % 16 or N % 16:
        return False, f"in={K}, out={N}: both must be multiples of 16 for the FP8 GEMM"
    if config.recipe is Recipe.BLOCKWISE and (K % 128 or N % 128):
        return False, f"in={K}, out={N}: blockwise FP8 needs multiples of 128 (its weights' 128x128 blocks)"
    if config.auto_filter and shape_rule:
        ok, reason = passes_shape_rule(K, N, config.recipe, config.cuda_graph)
        if not ok:
            return False, _SHAPE_RULE_MARK + reason
    if module_filter_fn is not None and not module_filter_fn(module, name):
        return False, "rejected by module_filter_fn"
    return True, ""


_MATCH_ALL = ("*", "**")  # include patterns that name nothing in particular
_SHAPE_RULE_MARK = "\0shape:"  # prefix of a reason that is the shape rule alone (removed before reporting)


def _convert_input_sharing_siblings(decisions, modules, decide) -> None:
    """A layer the shape rule alone kept in BF16 is converted when a layer reading the same input
    is converted: it then pays only its weight's cast (see :mod:`hf_fp8.filter`)."""
    converted = {d.name for d in decisions if d.converted}
    for i, d in enumerate(decisions):
        if d.converted or not d.reason.startswith(_SHAPE_RULE_MARK):
            continue
        ok, reason = False, d.reason.removeprefix(_SHAPE_RULE_MARK)
        if any(s in converted for s in input_sharing_siblings(d.name)):
            ok, reason = decide(d.name, modules[d.name])
            reason = reason or ""
        decisions[i] = ModuleDecision(d.name, d.in_features, d.out_features, ok, reason)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert(
    model: nn.Module,
    config: Fp8Config | str | None = None,
    *,
    module_filter_fn: ModuleFilter | None = None,
) -> ConversionReport:
    """Swap the model's ``nn.Linear`` layers for :class:`Fp8Linear` in place.

    Args:
        model (`nn.Module`): any model, e.g. a ``LlamaForCausalLM``. Converting twice with the same
            layer settings is a no-op for layers that are already ``Fp8Linear``; other settings
            (another recipe...) are an error: :func:`revert` first.
        config (`Fp8Config` or `str`, *optional*): the recipe, or a recipe name
            (``"tensorwise"``, ``"rowwise"``, ``"delayed"``). Defaults to ``Fp8Config()``.
        module_filter_fn (`Callable[[nn.Module, str], bool]`, *optional*): an extra veto,
            called with each candidate layer and its fully qualified name after the
            config's own rules.

    Returns:
        `ConversionReport`: per linear layer, converted or kept and why; ``print()`` it.

    Example:
        ```python
        >>> import torch, hf_fp8
        >>> with torch.device("meta"):  # shapes only: no memory is allocated
        ...     model = torch.nn.Sequential(torch.nn.Linear(4096, 14336), torch.nn.Linear(14336, 10))
        >>> report = hf_fp8.convert(model, "tensorwise")
        >>> report.converted
        ['0']
        >>> report.skipped["1"]
        'in=14336, out=10: both must be multiples of 16 for the FP8 GEMM'

        ```
    """
    if config is None:
        config = Fp8Config()
    elif isinstance(config, str):
        config = Fp8Config(recipe=config)
    elif not isinstance(config, Fp8Config):
        raise TypeError(f"convert: config must be an Fp8Config or a recipe name, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError(
            "convert: the model itself is an nn.Linear and cannot be swapped in place; "
            "use hf_fp8.Fp8Linear.from_linear(layer, config)"
        )

    _check_not_converted_differently(model, config)
    if config.full_bf16:
        _check_full_bf16_dtypes(model)
    output_embeddings = _output_embedding_ids(model)
    embedding_weights = _embedding_weight_ids(model)
    decisions: list[ModuleDecision] = []
    candidates: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            decisions.append(ModuleDecision(name, module.in_features, module.out_features, True, "already Fp8Linear"))
            continue
        if not isinstance(module, nn.Linear):
            continue
        if config.full_bf16:
            ok, reason = False, "full-BF16 mode (recipe=None): no FP8"
        else:
            ok, reason = _decide(name, module, config, output_embeddings, embedding_weights, module_filter_fn)
        decisions.append(ModuleDecision(name, module.in_features, module.out_features, ok, reason))
        candidates[name] = module
    _convert_input_sharing_siblings(
        decisions,
        candidates,
        lambda name, module: _decide(
            name, module, config, output_embeddings, embedding_weights, module_filter_fn, shape_rule=False
        ),
    )
    swaps = [(d.name, candidates[d.name]) for d in decisions if d.converted and d.name in candidates]
    _warn_unmatched_patterns(config, [d.name for d in decisions])

    for name, module in swaps:
        new = Fp8Linear.from_linear(module, config)
        new.fp8_name = name
        if config.fp8_weights:
            new.store_weight_in_fp8()  # frees this layer's high-precision weight before the next one
        _set_submodule(model, name, new)
    if config.fp8_weights and swaps:
        from hf_fp8.integrations.lora import enable_peft_fp8_weights

        enable_peft_fp8_weights()
    _hide_fp8_state_from_save_pretrained(model)
    if any(isinstance(m, Fp8Linear) and m._fp8_delayed is not None for m in model.modules()):
        from hf_fp8.delayed import install_delayed_update_hook

        install_delayed_update_hook(model)
    report = ConversionReport(
        decisions, config.short_str(), rope=_maybe_patch_rope(model, config), loss=_maybe_patch_loss(model, config)
    )
    if not config.full_bf16:
        _warn_low_coverage(report, config)
    if config.fp8_attention:
        report.notes.append(f"attention: {_switch_to_fp8_attention(model)}")
    if config.fused_ops:
        from hf_fp8.integrations.fused_ops import patch_fused_ops

        fused = patch_fused_ops(model)
        if fused:
            report.notes.append(f"fused RMSNorm, SwiGLU and embedding-gradient kernels in {fused} modules")
    if config.keep_activations != 0:
        from hf_fp8.recompute import install_selective_recompute

        if install_selective_recompute(model, config.keep_activations):
            report.notes.append(
                f"activation checkpointing (when enabled) keeps the last layers' activations: keep_activations="
                f"{config.keep_activations!r}"
            )
    else:
        from hf_fp8.recompute import remove_selective_recompute

        remove_selective_recompute(model)
    if config.full_bf16:
        report.notes.append("full-BF16: train with hf_fp8.optim.AdamW(..., full_bf16=True) for FP32 optimizer states")
    _warn_unsupported_family(model, config)
    logger.info("hf_fp8.convert: %d of %d linear layers converted", len(report.converted), len(decisions))
    return report


# what an Fp8Linear computes with; the other fields choose layers or patch the model
_LAYER_FIELDS = (
    "recipe",
    "grad_format",
    "amax_history_len",
    "amax_compute_algo",
    "margin",
    "use_fast_accum",
    "nonfinite",
    "fp8_weights",
    "save_weight_transpose",
)


def _check_not_converted_differently(model: nn.Module, config: Fp8Config) -> None:
    """Converting a converted model again is a no-op for its FP8 layers, so a request for other
    numerics would be silently ignored (and reported as done): refuse it."""
    for name, m in model.named_modules():
        if not isinstance(m, Fp8Linear):
            continue
        old = m.fp8_config
        diff = [f for f in _LAYER_FIELDS if getattr(old, f) != getattr(config, f)]
        if config.full_bf16 or diff:
            asked = "full-BF16 (recipe=None)" if config.full_bf16 else config.short_str()
            changed = ", ".join(f"{f}: {_value(getattr(old, f))} -> {_value(getattr(config, f))}" for f in diff)
            raise ValueError(
                f"convert: the model is already converted ({name or 'the root'} is an Fp8Linear with "
                f"{old.short_str()}), and this call asks for {asked}" + (f" ({changed})" if changed else "") + ". "
                "Converting again leaves existing FP8 layers as they are. To change the recipe, call "
                "hf_fp8.revert(model) first (it drops the FP8 state, keeps the weights), then convert."
            )


def _warn_unmatched_patterns(config: Fp8Config, names: list[str]) -> None:
    """A pattern that matches no linear layer is almost always a typo or another model's naming:
    the user asked for something that does nothing."""

    for field in ("include", "exclude"):
        for pattern in getattr(config, field):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                warnings.warn(
                    f"convert: Fp8Config.{field} pattern {pattern!r} matches none of the model's {len(names)} linear "
                    f"layers (names look like {names[:3]}; patterns are fnmatch, e.g. '*.k_proj')",
                    UserWarning,
                    stacklevel=3,
                )


def _warn_unsupported_family(model: nn.Module, config: Fp8Config) -> None:
    """One warning for an HF model whose family hf_fp8 does not patch: its linear layers are FP8,
    the rest stays HF's, and the user should know which of the requested parts that is."""
    from hf_fp8.integrations.families import family_of, supported_model_types

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or family_of(model) is not None:
        return
    missing = [
        what
        for what, wanted in (
            ("FP32 RoPE", config.fp32_rope),
            ("FP32 chunked loss", config.fp32_loss),
            ("fused RMSNorm/SwiGLU", config.fused_ops),
            ("selective recompute under activation checkpointing", config.keep_activations != 0),
        )
        if wanted
    ]
    if not missing:
        return
    warnings.warn(
        f"convert: model_type {model_type!r} is not in hf_fp8's model-family table ({', '.join(supported_model_types())}): "
        f"its linear layers are converted, but {', '.join(missing)} are not applied (HF's own code runs there). "
        "Adding a Llama-like family is one entry in hf_fp8/integrations/families.py.",
        UserWarning,
        stacklevel=3,
    )


def _warn_low_coverage(report: ConversionReport, config: Fp8Config) -> None:
    """FP8 was asked for, but no layer (or under half of the layers the user left eligible) is
    FP8: say so once, with the main reason and what changes it."""

    # not eligible: what the user's patterns or the model's structure keep, never the size rule
    kept_by_choice = (
        "excluded by pattern", "not matched by the include", "output embedding", "weight tied", "LoRA adapter",
        "frozen FP8 weights of a published checkpoint",
    )  # fmt: skip
    eligible = [d for d in report.decisions if d.converted or not d.reason.startswith(kept_by_choice)]
    converted = [d for d in eligible if d.converted]
    if not eligible or 2 * len(converted) >= len(eligible):
        return
    kept = [d for d in eligible if not d.converted]
    reasons: dict[str, int] = {}
    for d in kept:
        key = "size" if d.reason.startswith("too small for FP8") else d.reason
        reasons[key] = reasons.get(key, 0) + 1
    main, count = max(reasons.items(), key=lambda kv: kv[1])
    if main == "size":
        why = (
            f"{count} are below the size where {config.recipe.value} FP8 pays off on an H100 (the auto filter); "
            "Fp8Config(auto_filter=False) / --fp8_auto_filter false converts them anyway (slower there, same numerics)"
        )
        if config.recipe is not Recipe.DELAYED:
            why += ", or recipe='delayed' (smaller thresholds)"
    elif main.startswith("in="):
        why = f"{count} have a dimension that is not a multiple of 16, which the FP8 GEMM cannot take"
    else:
        why = f"{count}: {main}"
    warnings.warn(
        f"convert: FP8 was requested ({config.short_str()}) but only {len(converted)} of {len(eligible)} eligible linear "
        f"layers are FP8. Of the others, {why}. print(report) lists every layer and why.",
        UserWarning,
        stacklevel=3,
    )


def _value(v):
    return getattr(v, "value", v)


def _hide_fp8_state_from_save_pretrained(model: nn.Module) -> None:
    """``save_pretrained`` of a converted HF model writes a stock checkpoint: its delayed-scaling
    buffers (training state, not weights) are listed in the instance's ``_keys_to_ignore_on_save``.
    Trainer checkpoints keep them in a file of their own (:mod:`hf_fp8.state`)."""
    if not hasattr(model, "save_pretrained"):
        return
    fp8_keys = [k for k in model.state_dict() if k.endswith((".fp8_amax_history", ".fp8_scale"))]
    if not fp8_keys:
        return
    base = list(type(model)._keys_to_ignore_on_save or []) if hasattr(type(model), "_keys_to_ignore_on_save") else []
    model._keys_to_ignore_on_save = base + fp8_keys


def _check_full_bf16_dtypes(model: nn.Module) -> None:

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float16 in dtypes:
        raise ValueError(
            "convert: full-BF16 mode (recipe=None) got float16 parameters; float16's range overflows without loss "
            "scaling. Use model.to(torch.bfloat16)."
        )
    if torch.float32 in dtypes:
        warnings.warn(
            "convert: full-BF16 mode (recipe=None) got float32 parameters, so this run is not full-BF16 (RoPE, "
            "logits and loss are made FP32 all the same). Build the model under "
            "hf_fp8.set_default_dtype(torch.bfloat16) or call model.to(torch.bfloat16).",
            UserWarning,
            stacklevel=3,
        )


def _maybe_patch_rope(model: nn.Module, config: Fp8Config) -> str:
    from hf_fp8.integrations.rope import _attention_classes, patch_rope

    if not config.fp32_rope:
        return "left as is (fp32_rope=False)"
    if not _attention_classes(model):
        return "not patched (not a supported HF model family)"
    patch = patch_rope(model)
    return f"FP32 rotation in {len(patch.attention_modules)} attention layers, FP32 inv_freq"


def _switch_to_fp8_attention(model: nn.Module) -> str:
    from hf_fp8.integrations.attention import register_attention

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation"):
        return "unchanged (not an HF model with an attention interface)"
    name = register_attention()
    previous = getattr(cfg, "_attn_implementation", None)
    if previous != name:
        model.__dict__["_hf_fp8_previous_attn"] = previous
        model.set_attn_implementation(name)
    return f"FP8 (attn_implementation={name!r}, was {previous!r})"


def _maybe_patch_loss(model: nn.Module, config: Fp8Config) -> str:
    from hf_fp8.integrations.loss import patch_loss, trl_fused_lm_head

    if not config.fp32_loss:
        return "left as is (fp32_loss=False)"
    if not patch_loss(model):
        if trl_fused_lm_head(model):
            return "TRL's fused LM head (FP32 logits in chunks, computed by TRL)"
        return "not patched (not a supported HF causal LM)"
    return "FP32, chunked linear + cross-entropy (no full logits in training)"


def revert(model: nn.Module) -> int:
    """Swap every :class:`Fp8Linear` back to ``nn.Linear`` (same Parameters). Returns how many.

    FP8 state (delayed-scaling histories) is dropped; weights are untouched, since
    ``Fp8Linear`` keeps them in their original dtype (FP8-only weights are dequantized). RoPE
    and loss patches and an FP8-attention switch made by :func:`convert` are undone too.
    """
    from hf_fp8.integrations.fused_ops import unpatch_fused_ops
    from hf_fp8.integrations.loss import unpatch_loss
    from hf_fp8.integrations.rope import unpatch_rope

    unpatch_rope(model)
    unpatch_loss(model)
    unpatch_fused_ops(model)
    from hf_fp8.delayed import remove_delayed_update_hook
    from hf_fp8.recompute import remove_selective_recompute

    remove_selective_recompute(model)
    remove_delayed_update_hook(model)
    previous_attn = model.__dict__.pop("_hf_fp8_previous_attn", None)
    if previous_attn is not None:
        model.set_attn_implementation(previous_attn)
    model.__dict__.pop("_keys_to_ignore_on_save", None)
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Linear) and name]
    for name, module in swaps:
        _set_submodule(model, name, module.to_linear())
    return len(swaps)


def nonfinite_modules(model: nn.Module) -> dict[str, list[str]]:
    """Layers whose FP8 casts have seen inf/NaN since the last :func:`reset_nonfinite`.

    One device-to-host copy for the whole model; call it at logging steps, not every step.
    Returns ``{module name: ["input" | "weight" | "grad_output", ...]}``.
    """
    mods = [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    if not mods:
        return {}
    devices = {m.fp8_nonfinite.device for _, m in mods}
    if len(devices) == 1:
        flags = torch.stack([m.fp8_nonfinite for _, m in mods]).tolist()  # one device-to-host copy
    else:
        flags = [m.fp8_nonfinite.tolist() for _, m in mods]
    roles = ("input", "weight", "grad_output")
    return {name: [r for r, f in zip(roles, fl) if f] for (name, _), fl in zip(mods, flags) if any(fl)}


def reset_nonfinite(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.fp8_nonfinite.zero_()
