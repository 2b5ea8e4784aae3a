"""hf_fp8 quickstart: convert a Llama to FP8 and train it, next to a high-precision copy.

What it shows, on any machine (a CPU runs the exact FP8 emulation; a Hopper GPU the real
FP8 GEMMs and Triton kernels):

1. The automatic filter on Llama-3-8B layer shapes (built on the meta device, so no memory
   is used): which layers FP8 makes faster on an H100, and why the others stay in BF16.
2. A small Llama built in code, converted with every linear layer in FP8 (it is too small
   for FP8 to pay off, so the size filter is switched off), trained for a few steps on a
   synthetic next-token task next to an identical unconverted copy; both losses are
   printed side by side.

    python examples/quickstart.py [--recipe delayed|tensorwise|rowwise] [--steps 40] [--compile inductor]

``--compile`` trains the FP8 model under ``torch.compile`` (the FP8 layers, fused norms, RoPE and
loss are custom ops the compiler keeps whole; ``aot_eager`` needs no C++ compiler).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_fp8

VOCAB = 512


def llama_config(**shape) -> LlamaConfig:
    kw = dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        rope_theta=500000.0,
        attn_implementation="eager",
    )
    kw.update(shape)
    return LlamaConfig(**kw)


def synthetic_batches(batch: int, seq: int, seed: int):
    """Token sequences from a fixed random bigram chain (90% follow the chain): learnable fast."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(VOCAB, generator=g)
    while True:
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, seq):
            follow = torch.rand(batch, generator=g) < 0.9
            ids[:, t] = torch.where(follow, successor[ids[:, t - 1]], torch.randint(0, VOCAB, (batch,), generator=g))
        yield ids


def show_auto_filter(recipe: str) -> None:
    cfg = llama_config(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    print(f"== 1. the automatic filter on Llama-3-8B shapes ({recipe}) ==")
    print(hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe)))
    print()


def train(
    recipe: str, steps: int, seed: int, device: str, compile_backend: str | None = None
) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(llama_config()).to(device)
    model = copy.deepcopy(reference)
    print(f"== 2. a small Llama, every linear layer but lm_head in FP8 ({recipe}) ==")
    print(hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=recipe, auto_filter=False, exclude=("lm_head",))))
    print()
    opts = {name: torch.optim.AdamW(m.parameters(), lr=3e-3) for name, m in (("fp8", model), ("ref", reference))}
    run_fp8 = torch.compile(model, backend=compile_backend) if compile_backend else model
    losses: dict[str, list[float]] = {"fp8": [], "ref": []}
    data = synthetic_batches(8, 64, seed)
    print(f"{'step':>4}  {'loss fp8':>9}  {'loss fp32':>9}  {'rel. gap':>8}")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ids = next(data).to(device)
        for name, m in (("fp8", run_fp8), ("ref", reference)):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            losses[name].append(loss.item())
        if step == 1 or step % 5 == 0 or step == steps:
            f, r = losses["fp8"][-1], losses["ref"][-1]
            print(f"{step:>4}  {f:>9.4f}  {r:>9.4f}  {abs(f - r) / r:>8.2%}")
    print(f"{steps} steps of both models in {time.perf_counter() - t0:.1f} s on {device}")
    bad = hf_fp8.nonfinite_modules(model)
    print("non-finite values seen by FP8 casts:", bad or "none")
    return losses


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=hf_fp8.Fp8Config().recipe.value, choices=["delayed", "tensorwise", "rowwise"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", default=None, choices=["inductor", "aot_eager"], help="torch.compile the FP8 model")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backend = "FP8 tensor cores" if hf_fp8.fp8_gemm_supported(torch.device(args.device)) else "exact FP8 emulation"
    print(f"hf_fp8 {hf_fp8.__version__} on {args.device} ({backend})\n")
    show_auto_filter(args.recipe)
    return train(args.recipe, args.steps, args.seed, args.device, args.compile)


if __name__ == "__main__":
    main()
