"""FP32 logits and loss for HF causal LMs: a per-instance forward, reversible.

The patched ``LlamaForCausalLM.forward`` (or the family's: every causal LM in
:mod:`hf_fp8.integrations.families` has Llama's) runs the decoder as HF does, then

- with ``labels`` (or ``shift_labels``): computes the loss with
  :func:`hf_fp8.loss.chunked_linear_cross_entropy` (FP32 logits per chunk, never the full
  batch x seq x vocab tensor) and, in training mode, returns no logits unless the call
  passes ``return_logits=True``;
- without labels, or in eval mode: returns FP32 logits (FP32 accumulation of the lm_head GEMM);
- in training mode with labels and ``position_ids`` but no attention mask (sequences packed
  without padding, ``DataCollatorWithFlattening``): runs without a cache, so that transformers
  finds the packed sequences and keeps each one's attention to itself (with its default cache a
  stock HF training step attends across them);
- otherwise in training mode with labels, and unless the call asks for a cache (``use_cache=True`` or
  ``past_key_values``): hands the decoder a cache that stores nothing (``_TrainingStepCache``)
  and returns no cache. HF's default (``config.use_cache``) copies every layer's keys and
  values into a cache that a training step never reads (16 copies, ~0.85 ms and 268 MB at an
  8-layer 8B-shaped model, B=2, S=4096). Passing ``use_cache=False`` instead would change
  HF's path: without a cache, transformers checks ``position_ids`` for packed sequences, a
  host sync in eager mode and an explicit 4-D mask under tracing. With a cache present, as in
  HF's default, that check is skipped, and the stand-in keeps that path.

Model families are listed in one table (:mod:`hf_fp8.integrations.families`).
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
from torch import nn

from hf_fp8.instance_method import bind
from hf_fp8.integrations._kv_cache import cache_arg, output_cache, output_cache_field, take_cache
from hf_fp8.integrations.families import FAMILIES

__all__ = ["causal_lm", "patch_loss", "trl_fused_lm_head", "unpatch_loss"]

_CAUSAL_LM_CLASSES = frozenset(f.causal_lm for f in FAMILIES.values())

# Whether training steps with labels get the cache stand-in (read at every forward; the
# benchmarks turn it off to measure HF's default cache).
STORELESS_TRAINING_CACHE = True


def _lm_head_logits_fp32(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    from hf_fp8.loss import mm_fp32_out

    weight = lm_head.weight
    out = mm_fp32_out(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight.t())
    if getattr(lm_head, "bias", None) is not None:
        out = out + lm_head.bias.float()
    return out.view(*hidden.shape[:-1], weight.shape[0])


@functools.cache
def _training_step_cache_class() -> type:
    """HF's ``DynamicCache`` whose ``update`` stores nothing: built once, on first use, so that
    importing hf_fp8 does not import transformers."""
    from transformers.cache_utils import DynamicCache

    class _TrainingStepCache(DynamicCache):
        """Stands in for the cache HF builds by default in a training step.

        Masks and positions are computed before any layer's first update, from a cache of
        length 0, which this one reports for ever: the step takes HF's default path exactly.
        ``update`` returns the new keys and values, which is what a fresh cache's first update
        returns, without copying them."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return key_states, value_states

    return _TrainingStepCache


# per model: (its config object, a shallow copy of the config's attributes, the stand-in built from them)
_STEP_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _training_step_cache(model: nn.Module):
    """The model's cache stand-in, built once and reused by every training step: it stores
    nothing, so nothing carries over from one step to the next. Building one walks the config
    (HF's layer types): ~80 us of host time on a CPU dev machine, more on the lent H100's host,
    at the start of each step while the GPU waits. It is built again when the config object or
    any of its attributes changed."""
    cfg = model.config
    snapshot = dict(cfg.__dict__)
    entry = _STEP_CACHES.get(model)
    try:
        same = entry is not None and entry[0] is cfg and entry[1] == snapshot
    except Exception:  # an attribute whose == does not give a bool: build it every time
        same = False
    if not same:
        entry = (cfg, snapshot, _training_step_cache_class()(config=cfg))
        _STEP_CACHES[model] = entry
    return entry[2]


def _maybe_packed(attention_mask, position_ids) -> bool:
    return attention_mask is None and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2


def _causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from hf_fp8.loss import chunked_linear_cross_entropy

    past_key_values = take_cache(past_key_values, kwargs)  # ``cache`` since transformers 5.24
    return_logits = kwargs.pop("return_logits", False)
    return_dict = kwargs.pop("return_dict", None)
    shift_labels = kwargs.get("shift_labels")
    training_step = self.training and (labels is not None or shift_labels is not None)
    if training_step and use_cache is None and past_key_values is None and _maybe_packed(attention_mask, position_ids):
        # position_ids without a mask: possibly sequences packed without padding
        # (DataCollatorWithFlattening). HF looks for packed sequences only when no cache is passed,
        # and with its default cache a training step would attend across them (stock HF does):
        # no cache, so that transformers' check runs and each sequence attends to itself only
        use_cache = False
    no_store = (
        STORELESS_TRAINING_CACHE
        and training_step
        and use_cache is None
        and past_key_values is None
        and getattr(self.config, "use_cache", False)
    )
    if no_store:
        past_key_values = _training_step_cache(self)
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **{cache_arg(type(self.model).forward): past_key_values},
        **kwargs,
    )
    hidden = outputs.last_hidden_state
    if isinstance(logits_to_keep, int):
        hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
    else:
        hidden = hidden[:, logits_to_keep, :]

    loss = None
    if labels is not None or shift_labels is not None:
        loss = chunked_linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            labels if shift_labels is None else None,
            bias=getattr(self.lm_head, "bias", None),
            shift_labels=shift_labels,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            ignore_index=kwargs.get("ignore_index", -100),
        )
    logits = None
    if loss is None or not self.training or return_logits:
        logits = _lm_head_logits_fp32(self.lm_head, hidden)
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **{output_cache_field(CausalLMOutputWithPast): None if no_store else output_cache(outputs)},
    )
    return out.to_tuple() if return_dict is False else out


def causal_lm(model: nn.Module) -> nn.Module | None:
    """The supported causal LM that ``model`` is or wraps (a PEFT model's base model), or None."""
    for m in model.modules():
        if type(m).__name__ in _CAUSAL_LM_CLASSES and hasattr(m, "lm_head"):
            return m
    return None


def trl_fused_lm_head(model: nn.Module) -> bool:
    """Whether TRL's ``add_fused_lm_head`` replaced the forward of ``model``'s causal LM (TRL's
    trainers do, and then compute their losses from the decoder's output themselves).

    Recognised by the replacement's code: TRL keeps HF's name and signature on it (for
    ``generate``), but the code object is its own, from TRL's sources, with the
    ``fused_lm_head`` switch."""
    lm = causal_lm(model) or model
    # accelerate's mixed-precision wrapper keeps the forward it wrapped as ``_original_forward``
    for fn in (lm.__dict__.get("forward"), lm.__dict__.get("_original_forward")):
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None and "fused_lm_head" in code.co_varnames and f"{os.sep}trl{os.sep}" in code.co_filename:
            return True
    return False


def patch_loss(model: nn.Module) -> bool:
    """Give a supported causal LM (or the one a PEFT model wraps) the FP32 chunked loss and FP32
    logits. Returns whether it did.

    Idempotent; :func:`unpatch_loss` restores HF's forward. A forward that TRL's fused LM head
    already replaced is left to TRL (False): TRL computes its losses from the decoder's output
    itself, with FP32 logits in chunks.
    """
    lm = causal_lm(model)
    if lm is None:
        return False
    current = lm.__dict__.get("forward")
    if getattr(current, "__func__", None) is not _causal_lm_forward:
        if current is not None:
            if trl_fused_lm_head(lm):
                return False
            raise ValueError(
                "hf_fp8.patch_loss: this model's forward is already replaced on the instance (by another library's "
                "hook?); patch before wrapping it"
            )
        lm.forward = bind(_causal_lm_forward, lm)
    return True


def unpatch_loss(model: nn.Module) -> None:
    lm = causal_lm(model)
    if lm is not None and getattr(lm.__dict__.get("forward"), "__func__", None) is _causal_lm_forward:
        lm.__dict__.pop("forward", None)
