"""A manual training loop with the optimizer update deferred to the next forward.

``hf_fp8.optim.AdamW(defer_step=True)`` + ``opt.attach(model)``: ``opt.step()`` records the
update and the model's next forward launches it first, so on a GPU its kernels run while the
host launches the forward's first layers (the stretch of an eager step where the GPU otherwise
waits for the host). What ``hf_fp8.Trainer`` does with its AdamW when asked (``--fp8_defer_step true``; off by
default, because until the next forward anything that reads the weights another way sees them one step old).

The example trains the same FP8 Llama twice, with the update in ``step()`` and deferred, and
prints both runs' losses (identical, bit for bit), their final weights' agreement and, on a GPU,
the median step time of each.

    python examples/deferred_adamw.py [--steps 8] [--recipe delayed] [--layers 2]

Between ``step()`` and the next forward, the parameters keep their values from before the step:
read them after ``opt.flush()`` (``state_dict()`` of the model or the optimizer flushes by itself).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_fp8


def build(args, device: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        rope_theta=500000.0,
        attn_implementation="sdpa" if device == "cuda" else "eager",
    )
    torch.manual_seed(0)
    with torch.device(device), hf_fp8.set_default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(cfg)
    hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=args.recipe, auto_filter=False, exclude=("lm_head",)))
    return model


def run(args, device: str, defer: bool) -> tuple[list[float], list[float], dict]:
    model = build(args, device)
    opt = hf_fp8.optim.AdamW(
        model.parameters(), lr=1e-3, state_dtype=torch.bfloat16, stochastic_rounding=False, defer_step=defer
    )
    if defer:
        opt.attach(model)  # the forward (and model.state_dict / load_state_dict) run a pending update first
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses, times = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()  # deferred: recorded here, launched by the next forward
        opt.zero_grad(set_to_none=True)  # set_to_none=True: the pending update keeps its gradients
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    weights = model.state_dict()  # flushes the last deferred update first
    return losses, times, weights


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--recipe", default=hf_fp8.Fp8Config().recipe.value, choices=["delayed", "tensorwise", "rowwise"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    results = {name: run(args, args.device, defer) for name, defer in (("in step()", False), ("deferred", True))}
    (l_a, t_a, w_a), (l_b, t_b, w_b) = results["in step()"], results["deferred"]
    print(f"{'step':>4}  {'loss, update in step()':>22}  {'loss, deferred':>14}")
    for i, (a, b) in enumerate(zip(l_a, l_b), 1):
        print(f"{i:>4}  {a:>22.6f}  {b:>14.6f}")
    same_losses = l_a == l_b
    same_weights = all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    print(f"losses identical: {same_losses}; final weights identical: {same_weights}")
    if args.device == "cuda" and args.steps > 2:
        warm = slice(2, None)
        ms_a, ms_b = (statistics.median(t[warm]) * 1e3 for t in (t_a, t_b))
        print(f"median step: {ms_a:.2f} ms with the update in step(), {ms_b:.2f} ms deferred")
    return dict(losses=l_a, deferred_losses=l_b, same_losses=same_losses, same_weights=same_weights)


if __name__ == "__main__":
    main()
