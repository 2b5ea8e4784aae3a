"""One process of the CPU distributed tests (tests/test_distributed.py): train a tiny Llama for a
few steps under DDP or FSDP2 over gloo, or alone, and write the losses (and final weights' norm)
as JSON. Run as ``python tests/distributed_worker.py <mode> <recipe> <rank> <world> <port> <out>``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

GLOBAL_BATCH, SEQ, STEPS = 4, 32, 6


def main(mode: str, recipe: str, rank: int, world: int, port: int, out: str, vocab: int) -> None:
    """mode: single | ddp | fsdp2 | fsdp2_fp8ag (FP8 all-gather of the FP8 layers' weights) | fsdp2_save (train STEPS, checkpoint at STEPS // 2 into
    <out>.ckpt/) | fsdp2_resume (load that checkpoint, train the remaining steps)."""
    torch.set_num_threads(1)  # several processes on 2 cores: oversubscription makes steps 20-70x slower
    import torch.distributed as dist
    from llama_fixtures import bigram_batches, tiny_llama

    import hf_fp8
    from hf_fp8.distributed import attach_amax_sync

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_llama(vocab_size=vocab)
    full_bf16 = recipe == "full_bf16"
    # bf16_<recipe>: BF16 parameters with FP8 layers and the Trainer's default optimizer for them
    bf16_params = full_bf16 or recipe.startswith("bf16_")
    recipe = recipe.removeprefix("bf16_")
    if bf16_params:
        model.to(torch.bfloat16)
    cfg = hf_fp8.Fp8Config(recipe=None if full_bf16 else recipe, auto_filter=False, exclude=("lm_head",))
    hf_fp8.convert(model, cfg)
    core = model
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        if mode == "fsdp2_fp8ag" or os.environ.get("HF_FP8_TEST_FP8AG"):
            from hf_fp8.fsdp_fp8 import enable_fp8_all_gather

            enable_fp8_all_gather(core)
        for layer in core.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(core, mesh=mesh)
    if full_bf16:
        opt = hf_fp8.optim.AdamW(model.parameters(), lr=3e-3, full_bf16=True, seed=0)
    elif bf16_params:
        opt = hf_fp8.optim.AdamW(model.parameters(), lr=3e-3, state_dtype=torch.bfloat16, seed=0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if not os.environ.get("HF_FP8_TEST_NO_AMAX_SYNC"):
        attach_amax_sync(opt, core)
    seen_weights = set()  # what an FP8 layer's forward gets as its weight (FSDP2: the unsharded param)
    probe = next(m for m in core.modules() if isinstance(m, hf_fp8.Fp8Linear)) if not full_bf16 else None
    if probe is not None:
        probe.register_forward_pre_hook(lambda m, a: seen_weights.add(type(m.weight).__name__))
    data = bigram_batches(GLOBAL_BATCH, SEQ, vocab, seed=0)
    per_rank = GLOBAL_BATCH // world
    losses = []
    ckpt = Path(out.replace("fsdp2_resume", "fsdp2_save") + ".ckpt")
    first = 0
    if mode == "fsdp2_resume":
        from hf_fp8.distributed import load_sharded

        load_sharded(core, opt, str(ckpt / "sharded"))
        first = STEPS // 2
        for _ in range(first):
            next(data)  # the batches the saved run consumed before its checkpoint
    for step in range(first, STEPS):
        if mode == "fsdp2_save" and step == STEPS // 2:
            from hf_fp8.distributed import (
                full_state_dict,
                save_fp8_consolidated,
                save_pretrained_consolidated,
                save_sharded,
            )

            save_sharded(core, opt, str(ckpt / "sharded"))
            save_pretrained_consolidated(core, str(ckpt / "stock"))
            save_fp8_consolidated(core, str(ckpt / "fp8"))
            full = full_state_dict(core)
            if rank == 0:
                torch.save({k: v for k, v in full.items() if k.endswith("weight")}, ckpt / "full_weights.pt")
        ids = next(data)[rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    result = {"losses": losses}
    # the layers whose weights were last gathered in FP8 (their shard cast before the gather)
    result["fp8_gathered"] = sum("_fp8_gather_scale" in m.__dict__ for m in core.modules())
    result["weight_types"] = sorted(seen_weights)
    delayed = [m for m in core.modules() if isinstance(m, hf_fp8.Fp8Linear) and m._fp8_delayed is not None]
    if delayed:
        result["amax_history"] = [m.fp8_amax_history.tolist() for m in delayed]
    Path(out if rank == 0 else f"{out}.rank{rank}").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, recipe, rank, world, port, out, vocab = sys.argv[1:8]
    main(mode, recipe, int(rank), int(world), int(port), out, int(vocab))
    # Skip interpreter teardown: with gloo process groups it sometimes aborts the process after
    # all work is done ("terminate called without an active exception", SIGABRT), seen in 1 of
    # ~10 CI runs. The results are already written and the group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
