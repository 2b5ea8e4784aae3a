"""Data-parallel scaling of FP8 training on several GPUs (not run: no multi-GPU machine was lent).

    torchrun --nproc-per-node 8 -m benchmarks.bench_scaling [--strategy ddp fsdp2] [--layers 8]
    torchrun --nproc-per-node 8 -m benchmarks.bench_scaling --strategy fsdp2 --layers 32 --batch 1 \
        --checkpointing --precision bf16 delayed delayed_fp8ag torchao_fp8ag     # the whole 8B

For each strategy (DDP, FSDP2 ``fully_shard`` per decoder layer) and each precision (stock BF16,
hf_fp8 tensorwise, hf_fp8 delayed with the per-step amax all-reduce; ``_fp8ag``: FSDP2 gathers the
FP8 layers' weights in FP8, :func:`hf_fp8.enable_fp8_all_gather`; ``torchao_fp8ag``: torchao
float8 tensorwise with its FP8 all-gather, each decoder layer compiled), trains an HF Llama with
Llama-3-8B layer shapes, B=2 x S=4096 per GPU, and reports tokens/s per GPU, peak memory and
the last loss. Run it once with ``--nproc-per-node 1`` as the baseline: scaling efficiency is
tokens/s per GPU at N GPUs divided by tokens/s at 1. Rank 0 writes
``benchmarks/results/scaling_<gpu>_x<N>.json``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    ap.add_argument("--precision", nargs="+", default=["bf16", "tensorwise", "delayed"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="HF activation checkpointing")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fp8
    from benchmarks.common import environment, time_training_steps, write_json
    from hf_fp8.distributed import attach_amax_sync

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        attn_implementation="sdpa",
    )  # fmt: skip
    rows = []
    for strategy in args.strategy:
        for precision in args.precision:
            torch.manual_seed(0)
            with torch.device("cuda"), hf_fp8.set_default_dtype(torch.bfloat16):
                model = LlamaForCausalLM(cfg)
            fp8_gather = precision.endswith("_fp8ag")
            if fp8_gather and strategy != "fsdp2":
                continue  # an all-gather is FSDP's
            if precision.startswith("torchao"):
                from torchao.float8 import Float8LinearConfig, convert_to_float8_training

                convert_to_float8_training(
                    model.model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=fp8_gather),
                    module_filter_fn=lambda m, fqn: True,
                )  # fmt: skip
                for layer in model.model.layers:
                    layer.compile()
            elif precision != "bf16":
                hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=precision.removesuffix("_fp8ag")))
                if fp8_gather:
                    hf_fp8.enable_fp8_all_gather(model)
            if args.checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            core = model
            if strategy == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])
            else:
                from torch.distributed.fsdp import fully_shard

                for layer in core.model.layers:
                    fully_shard(layer)
                fully_shard(core)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            attach_amax_sync(opt, core)
            g = torch.Generator(device="cuda").manual_seed(rank)  # each rank its own data
            batches = [
                torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
                for _ in range(args.warmup + args.steps)
            ]
            timed = time_training_steps(model, opt, batches, args.warmup)
            row = dict(strategy=strategy, precision=precision, world=world, step_ms=timed["step_ms"],
                       tokens_per_s_per_gpu=timed["tokens_per_s"], peak_mem_gb=timed["peak_mem_gb"],
                       loss=timed["losses"][-1])  # fmt: skip
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
            del model, core, opt
            torch.cuda.empty_cache()
    if rank == 0:
        gpu = (
            "h100" if "H100" in torch.cuda.get_device_name() else torch.cuda.get_device_name().replace(" ", "_").lower()
        )
        write_json(f"scaling_{gpu}_x{world}.json", {"env": environment(), "args": vars(args), "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
