"""Where the GPU waits for the host in a training step, measured without a profiler.

    python -m benchmarks.profile_host_lead [--variants hf_fp8_delayed_hfadamw torchao_tensorwise_compile]

The profiler slows the host (every launch is recorded), so its idle-gap report overstates
host-bound stretches. Here each step carries marks: at the step start, before and after each
decoder layer in the forward, when the backward reaches each layer (a full backward pre-hook),
before and after ``optimizer.step()``. Each mark records the host clock and a CUDA event on
the compute stream. Per mark, ``lead_ms`` = (when the GPU reached the mark) - (when the host
enqueued it), both from the step start: the work the GPU still had queued when the host got
there. A lead near 0 means the GPU had caught up and waited for the host's next launch: a
stretch between marks where the lead stays near 0 is host-bound, and a growing lead means the
host runs ahead. The backward pre-hooks add one identity node per layer (torch's full backward
hooks), a few microseconds of host time each.

Same models, batches and optimizer as ``bench_llama``. Results:
``benchmarks/results/llama_host_lead_h100.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class _Marks:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.host: list[float] = []
        self.events: list[torch.cuda.Event] = []

    def mark(self, name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.host.append(time.perf_counter())
        self.names.append(name)
        self.events.append(ev)

    def read(self) -> list[dict]:
        torch.cuda.synchronize()
        h0, e0 = self.host[0], self.events[0]
        out = []
        for n, h, e in zip(self.names, self.host, self.events):
            gpu_ms = e0.elapsed_time(e)
            host_ms = (h - h0) * 1e3
            out.append(
                dict(mark=n, host_ms=round(host_ms, 3), gpu_ms=round(gpu_ms, 3), lead_ms=round(gpu_ms - host_ms, 3))
            )
        return out


def lead_variant(name: str, config: dict, batch: int, seq: int, warmup: int, steps: int, prelude: bool = False) -> dict:
    from benchmarks.bench_llama import bigram_batches, build

    model, opt, note = build(name, config)
    batches = bigram_batches(batch, seq, config["vocab_size"], warmup + steps)
    marks = _Marks()
    layers = list(model.model.layers)
    handles = []
    if prelude:  # where the host's time goes before layer 0, and inside it
        inner = model.model
        handles.append(model.register_forward_pre_hook(lambda m, a: marks.mark("model pre-hooks start"), prepend=True))
        handles.append(model.register_forward_pre_hook(lambda m, a: marks.mark("model pre-hooks end")))
        handles.append(inner.register_forward_pre_hook(lambda m, a: marks.mark("decoder model start")))
        handles.append(inner.embed_tokens.register_forward_hook(lambda m, a, o: marks.mark("embedding end")))
        handles.append(inner.rotary_emb.register_forward_pre_hook(lambda m, a: marks.mark("rotary start")))
        handles.append(inner.rotary_emb.register_forward_hook(lambda m, a, o: marks.mark("rotary end")))
        for li in (0, 1):
            layer = layers[li]
            for sub, label in ((layer.self_attn, f"L{li} attention"), (layer.mlp, f"L{li} mlp")):
                handles.append(sub.register_forward_pre_hook(lambda m, a, label=label: marks.mark(f"{label} start")))
                handles.append(sub.register_forward_hook(lambda m, a, o, label=label: marks.mark(f"{label} end")))
        # inside the attention blocks of layers 0 and 1: after the q/k/v node, the RoPE, the
        # attention kernel and o_proj (module-level functions of hf_fp8.integrations.rope wrapped
        # for the run; hooks on the FP8 layers themselves would change their path)
        from hf_fp8.integrations import rope as hf_rope

        which = {"layer": None}
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: which.__setitem__("layer", i)))
        originals = {n: getattr(hf_rope, n) for n in ("fused_norm_linears", "fp32_rope", "linear_on_kept_input")}

        def wrapped(name, fn):
            def call(*a, **k):
                out = fn(*a, **k)
                if which["layer"] in (0, 1):
                    marks.mark(f"L{which['layer']} {name} done")
                return out

            return call

        for n, fn in originals.items():
            setattr(hf_rope, n, wrapped(n, fn))

        class _Restore:
            def remove(self):
                for n, fn in originals.items():
                    setattr(hf_rope, n, fn)

        handles.append(_Restore())
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: marks.mark(f"fwd layer {i} start")))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: marks.mark(f"fwd layer {i} end")))
        handles.append(layer.register_full_backward_pre_hook(lambda m, g, i=i: marks.mark(f"bwd layer {i} start")))
    per_step = []
    for k, ids in enumerate(batches):
        torch.cuda.synchronize()
        marks.__init__()
        marks.mark("step start")
        loss = model(input_ids=ids, labels=ids).loss
        marks.mark("forward end (loss computed)")
        loss.backward()
        marks.mark("backward end")
        opt.step()
        marks.mark("optimizer end")
        opt.zero_grad(set_to_none=True)
        rows = marks.read()
        if k >= warmup:
            per_step.append(rows)
    for h in handles:
        h.remove()
    # median over steps of each mark's numbers (same marks in the same order every step)
    med = []
    for j, first in enumerate(per_step[0]):
        med.append(
            dict(
                mark=first["mark"],
                **{
                    key: round(statistics.median(s[j][key] for s in per_step), 3)
                    for key in ("host_ms", "gpu_ms", "lead_ms")
                },
            )
        )
    del model, opt
    return dict(variant=name, note=note, marks=med)


def main() -> None:
    from benchmarks.bench_llama import CONFIGS
    from benchmarks.common import each_variant, environment, warm_up_gpu, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["hf_fp8_delayed_hfadamw", "torchao_tensorwise_compile"])
    ap.add_argument("--config", default="8b", choices=sorted(CONFIGS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="llama_host_lead_h100.json")
    ap.add_argument(
        "--prelude",
        action="store_true",
        help="more marks before layer 0 (model pre-hooks, embedding, rotary) and inside it (attention, MLP); "
        "their hooks add host time, so read the step's total from a run without this",
    )
    args = ap.parse_args()
    warm_up_gpu()
    rows = []
    measure = lambda name: lead_variant(name, CONFIGS[args.config], 2, 4096, args.warmup, args.steps, args.prelude)  # noqa: E731
    for row in each_variant(args.variants, measure):
        name = row["variant"]
        rows.append(row)
        print(name, row.get("note", row.get("error")), flush=True)
        for m in row.get("marks", []):
            print(
                f"   {m['mark']:<32} host {m['host_ms']:8.2f}  gpu {m['gpu_ms']:8.2f}  lead {m['lead_ms']:8.2f}",
                flush=True,
            )
        write_json(args.out, dict(env=environment(), config=args.config, rows=rows))


if __name__ == "__main__":
    main()
