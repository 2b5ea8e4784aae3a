"""FP8 checkpoints in transformers' own fine-grained FP8 format (what vLLM and transformers serve).

Format, as ``transformers.integrations.finegrained_fp8`` reads it:

- every quantized linear layer ``<name>`` stores ``<name>.weight`` as ``float8_e4m3fn`` (N, K)
  and ``<name>.weight_scale_inv`` as FP32 (ceil(N/bm), ceil(K/bn)): each bm x bn block of
  the weight (128x128 by default; a published checkpoint's own layout after
  :func:`hf_fp8.from_pretrained`) is ``fp8 * weight_scale_inv[block]``;
- ``config.json`` carries ``quantization_config = {"quant_method": "fp8", "activation_scheme":
  "dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": [...]}``: layers
  listed there (lm_head here) keep their high-precision weights.

Block scales follow the loader's own quantizer: ``scale_inv = amax(block) / 448`` (1 for an
all-zero block). Layers trained with the ``blockwise`` recipe are written with the codes and
scales their forward computed with (128x128 blocks), so the served weights are the
quantization the model trained against. :func:`load_fp8` reads such a checkpoint on any machine (dequantizing on
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


def quantize_blockwise(w: torch.Tensor, block: int | tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (FP8 (N, K), FP32 scale_inv (ceil(N/bm), ceil(K/bn))) for ``block = b`` or
    ``(bm, bn)`` (rows x columns per scale); partial edge blocks allowed."""
    N, K = w.shape
    bm, bn = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
    nb, kb = -(-N // bm), -(-K // bn)
    padded = torch.zeros(nb * bm, kb * bn, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w.float()
    tiles = padded.view(nb, bm, kb, bn)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, _E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = (tiles * scale[:, None, :, None]).clamp(-_E4M3_MAX, _E4M3_MAX).to(_E4M3)
    return q.view(nb * bm, kb * bn)[:N, :K].contiguous(), (1.0 / scale).to(torch.float32)


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: int | tuple[int, int] | list[int] = BLOCK
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` (in FP32, then one rounding to ``dtype``).

    ``block`` is ``weight_block_size``: ``b`` or ``[bm, bn]`` (rows x columns of the weight per
    scale); the scale is then (ceil(N/bm), ceil(K/bn))."""
    bm, bn = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
    N, K = q.shape
    expected = (-(-N // bm), -(-K // bn))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_blockwise: a ({N}, {K}) weight in [{bm}, {bn}] blocks needs a {expected} scale, "
            f"got {tuple(scale_inv.shape)}"
        )
    s = scale_inv.float().repeat_interleave(bm, 0)[:N].repeat_interleave(bn, 1)[:, :K]
    return (q.float() * s).to(dtype)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block_size: list[int] | None, *, name: str = "weight"
) -> torch.Tensor:
    """An FP8 checkpoint weight times its scale, whichever granularity the scale has:

    - per tensor: one value (shape ``()``, ``(1,)`` or ``(1, 1)``);
    - per output channel: ``(N,)`` or ``(N, 1)``;
    - blocks of ``block_size = [bm, bn]``: ``(ceil(N/bm), ceil(K/bn))``.

    Computed in FP32 and rounded once to ``dtype``. A scale of any other shape is an error
    naming the weight, never a guess."""
    N, K = q.shape
    if scale.numel() == 1:
        return (q.float() * scale.float().reshape(())).to(dtype)
    if tuple(scale.shape) in ((N,), (N, 1)) and block_size is None:
        return (q.float() * scale.float().reshape(N, 1)).to(dtype)
    if block_size is not None:
        if len(block_size) != 2 or not all(int(b) > 0 for b in block_size):
            raise ValueError(f"{name}: weight_block_size must be [rows, columns] > 0, got {block_size!r}")
        try:
            return dequantize_blockwise(q, scale, dtype, block_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if tuple(scale.shape) in ((N,), (N, 1)):
        return (q.float() * scale.float().reshape(N, 1)).to(dtype)
    raise ValueError(
        f"{name}: a ({N}, {K}) FP8 weight with a scale of shape {tuple(scale.shape)} and no weight_block_size: "
        "expected one value (per tensor) or one per output row"
    )


def _linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def save_fp8(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    keep: tuple[str, ...] = ("lm_head",),
    state_dict: dict[str, torch.Tensor] | None = None,
    block_size: int | tuple[int, int] | None = None,
    max_shard_size: int | str | None = None,
    tokenizer=None,
    push_to_hub: str | bool = False,
) -> str:
    """Write ``model`` as an FP8 checkpoint transformers' FP8 loader understands. Returns the directory.

    The weights and ``config.json`` are written under temporary names and renamed into place
    (the config last), so a failed export leaves an earlier one in the folder loadable; weight
    files of an earlier checkpoint there (shards, their index, ``pytorch_model*.bin``) are removed.

    Args:
        model: an HF causal LM (converted by hf_fp8 or not).
        keep: module names left in the model's own dtype (``modules_to_not_convert``).
        state_dict: the full state dict to write instead of ``model.state_dict()`` (a sharded
            model's, gathered; see :func:`hf_fp8.distributed.save_fp8_consolidated`).
        block_size: the ``weight_block_size``, ``b`` or ``(rows, cols)``. transformers' loader
            needs every quantized weight's shape to be a multiple of it (one size for the whole
            checkpoint). Default: the block of the published checkpoint the model was loaded
            from (:func:`hf_fp8.from_pretrained`), whose layers still holding their codes are
            then written bit for bit (a LoRA-merged layer is quantized once, in that layout);
            else the largest of 128, 64, 32 and 16 that divides every layer's dims (hidden 576
            with k/v 192: 64). A layer that the block does not divide is kept in its own dtype
            and listed in ``modules_to_not_convert``, with a warning.
        max_shard_size: shard the weights as ``save_pretrained`` does (``"5GB"``, or bytes):
            ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``. Default: one file.
        tokenizer: a tokenizer or processor to save beside the weights (``save_pretrained``).
        push_to_hub: upload the folder to this Hub repo id (``True``: the folder's name), as
            ``push_to_hub`` does; needs a login (``huggingface-cli login``).

    The model's generation config is saved too, so the folder loads like a Hub checkpoint.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = model.config
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v for k, v in source.items() if not k.endswith((".fp8_amax_history", ".fp8_scale"))}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the loader re-ties it
    not_converted = list(keep)
    candidates = [
        name
        for name in _linear_weights(model)
        if not any(name == k or name.endswith("." + k) for k in keep) and f"{name}.weight" in state
    ]
    shapes = {name: tuple(state[f"{name}.weight"].shape) for name in candidates}
    stored = _stored_fp8_layers(model)  # a published checkpoint's layers, codes as loaded
    trained = _blockwise_trained_layers(model)  # the blockwise recipe's layers: its own codes
    blocks = {layer.fp8_weight_block for layer in stored.values()} - {None}
    if trained:
        blocks.add((BLOCK, BLOCK))
    if block_size is None and len(blocks) == 1:
        block_size = next(iter(blocks))
    block = block_size or _block_for(shapes.values())
    bm, bn = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
    undivided = [name for name, (n, k) in shapes.items() if n % bm or k % bn]
    if undivided:
        import warnings

        warnings.warn(
            f"save_fp8: {len(undivided)} layers have dims that weight_block_size [{bm}, {bn}] does not divide "
            f"(e.g. {undivided[0]}: {shapes[undivided[0]]}); transformers' loader would refuse them, so they are "
            "written in their own dtype and listed in modules_to_not_convert",
            UserWarning,
            stacklevel=2,
        )
        not_converted += undivided
    for name in candidates:
        if name in undivided:
            continue
        layer = stored.get(name)
        if layer is not None and layer.fp8_weight_block == (bm, bn):  # the checkpoint's own codes, as read
            q, s = layer.weight.detach(), layer.fp8_weight_scale_inv
        elif name in trained and (bm, bn) == (BLOCK, BLOCK):  # what the blockwise forward computed with
            from hf_fp8.kernels.blockwise_reference import quantize_blocks

            qb = quantize_blocks(state[f"{name}.weight"], torch.float8_e4m3fn)
            q, s = qb.data, qb.scale_inv
        else:  # dequantized already for FP8-only weights
            q, s = quantize_blockwise(state[f"{name}.weight"], (bm, bn))
        state[f"{name}.weight"] = q
        state[f"{name}.weight_scale_inv"] = s
    cfg = config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [bm, bn],
        "modules_to_not_convert": not_converted,
    }
    # Written beside the final names, then renamed into place, config last: an export that fails
    # midway (a full disk, an unserializable config) leaves the previous one loadable.
    config_text = json.dumps(cfg, indent=2, sort_keys=True, default=str)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    files = _weight_files(tensors, max_shard_size)
    suffix = f".tmp-{os.getpid()}"
    config_path = os.path.join(directory, "config.json")
    written: list[str] = []
    try:
        for name, content in files.items():
            path = os.path.join(directory, name) + suffix
            written.append(path)
            if isinstance(content, str):
                with open(path, "w") as f:
                    f.write(content)
            else:
                save_file(content, path, metadata={"format": "pt"})
        written.append(config_path + suffix)
        with open(config_path + suffix, "w") as f:
            f.write(config_text)
    except BaseException:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        raise
    for name in files:
        os.replace(os.path.join(directory, name) + suffix, os.path.join(directory, name))
    _remove_stale_weights(directory, keep=set(files))
    os.replace(config_path + suffix, config_path)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if push_to_hub:
        _push(directory, push_to_hub)
    return str(directory)


def _blockwise_trained_layers(model: nn.Module) -> set[str]:
    """Names of the FP8 layers that train with the blockwise recipe (128x128 weight blocks)."""
    from hf_fp8.config import Recipe
    from hf_fp8.linear import Fp8Linear

    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, Fp8Linear) and m.fp8_config.recipe is Recipe.BLOCKWISE and not m.has_fp8_weight
    }


def _stored_fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the frozen layers that still hold a published checkpoint's FP8 codes."""
    from hf_fp8.frozen_fp8 import FrozenFp8Linear

    return {name: m for name, m in model.named_modules() if isinstance(m, FrozenFp8Linear) and m.has_fp8_weight}


def _weight_files(tensors: dict[str, torch.Tensor], max_shard_size: int | str | None) -> dict[str, object]:
    """``{file name: tensors}`` (and the index's JSON text when sharded), as transformers names them."""
    if max_shard_size is None:
        return {"model.safetensors": tensors}
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    if not split.is_sharded:
        return {"model.safetensors": tensors}
    files: dict[str, object] = {name: {k: tensors[k] for k in keys} for name, keys in split.filename_to_tensors.items()}
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2, sort_keys=True)
    return files


def _push(directory: str | os.PathLike, repo: str | bool) -> None:
    """Upload the export to the Hub (``repo``: a repo id, or True for the folder's name)."""
    from huggingface_hub import HfApi

    repo_id = os.path.basename(os.path.normpath(str(directory))) if repo is True else str(repo)
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message="Upload FP8 checkpoint (hf_fp8)")


def _block_for(shapes) -> int:
    """The largest of 128, 64, 32, 16 that divides every (N, K) in ``shapes`` (16 if none does:
    the layers it does not divide are then kept out of the FP8 export)."""
    for block in (BLOCK, 64, 32, 16):
        if all(n % block == 0 and k % block == 0 for n, k in shapes):
            return block
    return 16


def _remove_stale_weights(directory: str | os.PathLike, keep: set[str]) -> None:
    """Weight files of an earlier checkpoint in the folder (shards, their index, .bin files):
    left there, a loader could read them instead of, or mixed with, this export."""
    import glob

    patterns = (
        "model*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
    )
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(str(directory)), pattern)):
            if os.path.basename(path) not in keep:
                os.remove(path)


def _local_folder(path: str, caller: str = "load_fp8") -> str:
    """``path`` itself if it is a folder, else a Hub repo id downloaded (config and safetensors)."""
    if os.path.isdir(path):
        return path
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/")) and not os.path.exists(path)
    if not looks_like_repo:
        raise FileNotFoundError(f"{caller}: {path!r} is not a folder (nor a Hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001  offline, no such repo, no access: say which and why
        raise FileNotFoundError(f"{caller}: {path!r} is not a local folder, and the Hub download failed: {e}") from e


def _quantized_config(path: str, caller: str):
    """(local folder, the checkpoint's config without its quantization_config, that config as a
    dict) for a folder or Hub id, with errors naming ``caller``."""
    from transformers import AutoConfig

    directory = _local_folder(str(path), caller)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{caller}: {directory} has no config.json")
    config = AutoConfig.from_pretrained(directory)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        raise ValueError(
            f"{caller}: {directory} has no quantization_config; load it with transformers' from_pretrained"
        )
    del config.quantization_config
    return directory, config, qcfg if isinstance(qcfg, dict) else qcfg.to_dict()


def _read_checkpoint_tensors(directory: str, caller: str = "load_fp8") -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards ``model.safetensors.index.json`` lists."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        tensors: dict[str, torch.Tensor] = {}
        shards = sorted(set(weight_map.values()))
        if len(shards) > 1:
            from tqdm.auto import tqdm

            shards = tqdm(shards, desc="Loading checkpoint shards", unit="shard")
        for shard in shards:
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{caller}: {index} lists {shard}, which is not in {directory}")
            tensors.update(load_file(path))
        return tensors
    raise FileNotFoundError(f"{caller}: {directory} has neither model.safetensors nor model.safetensors.index.json")


def load_fp8(
    directory: str | os.PathLike,
    fp8_config=None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
):
    """Read an FP8 checkpoint (ours or any in transformers' ``quant_method: fp8`` format), from a
    local folder or a Hub repo id, into a trainable model.

    Weights are dequantized on ``device`` (CPU by default: no GPU needed) into ``dtype``, exactly
    (FP32 product, one rounding), whatever their scales' granularity: blocks of any
    ``weight_block_size = [rows, columns]``, one scale per output channel or per tensor. The
    weights may be in ``model.safetensors`` or in shards listed by ``model.safetensors.index.json``.
    Then the model is converted with ``fp8_config`` (an :class:`hf_fp8.Fp8Config`, a recipe name, or
    ``None`` to leave it unconverted). Returns ``(model, report)``. For full training: every weight
    becomes trainable in ``dtype``. For adapters on frozen FP8 weights kept as stored (no
    high-precision copy), use :func:`hf_fp8.from_pretrained`.

    Raises:
        FileNotFoundError: ``directory`` is not a checkpoint folder, or a shard it lists is missing.
        ValueError: not an FP8 checkpoint, a scale whose shape fits no granularity, missing keys.
    """
    from transformers import AutoModelForCausalLM

    directory, config, qcfg = _quantized_config(directory, "load_fp8")
    if qcfg.get("quant_method") != "fp8":
        raise ValueError(f"load_fp8: quant_method is {qcfg.get('quant_method')!r}, expected 'fp8'")
    block_size = qcfg.get("weight_block_size")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    raw = _read_checkpoint_tensors(directory)
    state = {}
    for key, value in raw.items():
        if key.endswith((".weight_scale_inv", ".weight_scale")):
            continue
        base = key[: -len("weight")] if key.endswith(".weight") else None
        scale_inv = raw.get(f"{base}weight_scale_inv") if base else None
        if scale_inv is None and base:
            scale_inv = raw.get(f"{base}weight_scale")  # compressed-tensors' name: also multiplied in
        if scale_inv is not None and value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            state[key] = dequantize_weight(value.to(device), scale_inv.to(device), dtype, block_size, name=key)
        else:
            state[key] = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
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
