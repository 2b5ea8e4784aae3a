"""Train with each step's forward and backward replayed as one CUDA graph (``hf_fp8.CudaGraphStep``).

    python examples/cuda_graph_step.py                 # tiny Llama + public-domain text; needs a CUDA GPU
    python examples/cuda_graph_step.py --recipe delayed --steps 100

Trains a copy of the model eagerly and another through ``CudaGraphStep`` on the same batches and
prints both losses and step times side by side: the losses agree (same kernels, same data),
and where the GPU was waiting on the host the graph is faster. Every batch has the same shape
(``drop_last=True``) and no ``attention_mask``: one unpadded sequence per row, as a graph
needs for SDPA's causal path (see the class's docstring for what a graph cannot do).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import hf_fp8

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, TextBlocks, load  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", default=None)
    ap.add_argument("--recipe", default=hf_fp8.Fp8Config().recipe.value, choices=["delayed", "tensorwise", "rowwise"])
    ap.add_argument("--text_file", default=str(DEFAULT_TEXT))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("examples/cuda_graph_step.py needs a CUDA GPU: CUDA graphs do not exist on the CPU.")

    text = Path(args.text_file).read_text()
    model, tokenizer = load(args.model_name_or_path, text, dtype=torch.bfloat16)
    model.set_attn_implementation("sdpa")
    model.cuda()
    embedded = args.model_name_or_path is None
    # the embedded model is too small for FP8 to pay off: convert all its layers anyway, to show the path
    # cuda_graph=True: the auto filter's thresholds measured with graph-replayed steps
    config = hf_fp8.Fp8Config(recipe=args.recipe, auto_filter=not embedded, exclude=("lm_head",), cuda_graph=True)
    print(hf_fp8.convert(model, config))
    eager_model = copy.deepcopy(model)
    data = torch.utils.data.DataLoader(
        TextBlocks(text, tokenizer, args.seq_len),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # one shape for every batch: the graph was captured for it
        generator=torch.Generator().manual_seed(0),
    )
    graph_step = hf_fp8.CudaGraphStep(model)  # built before any step (see its docstring)
    runs = {
        "eager": (eager_model, lambda b: _eager_step(eager_model, b)),
        "graph": (model, lambda b: graph_step(**b)),
    }
    opts = {name: torch.optim.AdamW(m.parameters(), lr=args.lr, fused=True) for name, (m, _) in runs.items()}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    print("step   eager loss   graph loss   eager ms   graph ms")
    step = 0
    while step < args.steps:
        for batch in data:
            step += 1
            batch = {k: v.cuda() for k, v in batch.items()}
            for name, (_, run) in runs.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = run(batch)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) * 1e3)
                losses[name].append(loss.item())
                del loss  # an eager loss kept alive would pin the gradient accumulators to its stream
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(
                    f"{step:4d}  {losses['eager'][-1]:11.4f}  {losses['graph'][-1]:11.4f}  "
                    f"{times['eager'][-1]:9.2f}  {times['graph'][-1]:9.2f}",
                    flush=True,
                )
            if step == args.steps:
                break
    later = slice(len(times["eager"]) // 2, None)  # the first steps compile and capture
    med = {name: sorted(t[later])[len(t[later]) // 2] for name, t in times.items()}
    print(f"median step: eager {med['eager']:.2f} ms, graph {med['graph']:.2f} ms ({med['eager'] / med['graph']:.2f}x)")
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["graph"], strict=True))
    print(f"largest relative loss difference over {args.steps} steps: {worst:.2e}")
    return losses


def _eager_step(model, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


if __name__ == "__main__":
    main()
