"""Where one training step's peak memory happens: allocated memory at each decoder layer's forward
and backward boundaries, and the peak inside each segment between two boundaries.

    python -m benchmarks.profile_memory [--variants stock_bf16 hf_fp8_delayed_all] [--config 8b]

Same models, batches and optimizer as ``bench_llama`` (B=2, S=4096). Two warm-up steps, then
one step with a synchronize + ``reset_peak_memory_stats`` at every boundary (forward start/end
of each layer through module hooks, backward start/end of each layer through tensor hooks on
its output and input, the loss, the optimizer step): each segment's ``peak_gb`` is the most
memory allocated between its two boundaries. Timing is meaningless here (a sync per boundary).

Results: ``benchmarks/results/memory_profile_h100.json``.
"""

from __future__ import annotations

import argparse
import gc

import torch


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def profile_variant(name: str, config: dict, batch: int, seq: int) -> dict:
    from benchmarks.bench_llama import bigram_batches, build

    model, opt, note = build(name, config)
    batches = bigram_batches(batch, seq, config["vocab_size"], 3)
    for ids in batches[:2]:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    segments: list[dict] = []
    state = {"last": "step start"}

    def mark(boundary: str) -> None:
        torch.cuda.synchronize()
        segments.append(
            dict(
                segment=f"{state['last']} -> {boundary}",
                peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                end_gb=torch.cuda.memory_allocated() / 1e9,
            )
        )
        state["last"] = boundary
        torch.cuda.reset_peak_memory_stats()

    handles = []
    for i, layer in enumerate(model.model.layers):

        def pre(module, args, kwargs, i=i):
            mark(f"L{i} fwd start")
            x = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
            if x is not None and x.requires_grad:
                x.register_hook(lambda g, i=i: mark(f"L{i} bwd end") or None)

        def post(module, args, kwargs, out, i=i):
            mark(f"L{i} fwd end")
            y = _first_tensor(out)
            if y is not None and y.requires_grad:
                y.register_hook(lambda g, i=i: mark(f"L{i} bwd start") or None)

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    ids = batches[2]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_gb = torch.cuda.memory_allocated() / 1e9
    loss = model(input_ids=ids, labels=ids).loss
    mark("loss computed")
    loss.backward()
    mark("backward done")
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark("optimizer step done")
    for h in handles:
        h.remove()
    top = max(segments, key=lambda s: s["peak_gb"])
    del model, opt, loss
    gc.collect()
    torch.cuda.empty_cache()
    return dict(variant=name, note=note, start_gb=start_gb, peak_gb=top["peak_gb"], peak_segment=top["segment"],
                segments=segments)  # fmt: skip


def main() -> None:
    from benchmarks.bench_llama import CONFIGS
    from benchmarks.common import environment, warm_up_gpu, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["stock_bf16", "hf_fp8_delayed_all"])
    ap.add_argument("--config", default="8b", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--out", default="memory_profile_h100.json")
    args = ap.parse_args()
    warm_up_gpu()
    rows = []
    for name in args.variants:
        row = profile_variant(name, CONFIGS[args.config], args.batch, args.seq)
        rows.append(row)
        print(f"{name}: start {row['start_gb']:.2f} GB, peak {row['peak_gb']:.2f} GB in '{row['peak_segment']}'")
        for s in sorted(row["segments"], key=lambda s: -s["peak_gb"])[:8]:
            print(f"    {s['peak_gb']:7.2f} GB peak, {s['end_gb']:7.2f} GB after: {s['segment']}")
    print(f"wrote {write_json(args.out, {'env': environment(), 'config': args.config, 'rows': rows})}")


if __name__ == "__main__":
    main()
