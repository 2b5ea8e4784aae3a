"""FP32 RoPE, chunked FP32 loss and FP32-state AdamW on the H100, against HF eager, Liger and torch.

    python -m benchmarks.bench_precision_ops [rope loss adamw]

RoPE: B=2, S=4096, 32 query / 8 key heads, head_dim 128, BF16, rope_theta=500000; forward
and fwd+bwd (backward through both outputs). HF and Liger include computing their BF16
cos/sin (HF's rotary module), since our kernel computes cos/sin itself. Each row also
records the fraction of outputs equal to the correctly rounded rotation (float64).
Loss: B=2, S=4096, hidden 4096, vocab 128256, BF16 hidden states and lm_head; fwd+bwd time
and peak memory above the inputs, for HF's path (BF16 logits, upcast, cross-entropy),
Liger's fused linear cross-entropy and ours.
AdamW: the parameters of 4 Llama-3-8B decoder layers (872M); step time for torch fused
AdamW on BF16 parameters (BF16 states), on FP32 parameters (FP32 states), and ours on BF16
parameters with FP32 states and stochastic rounding.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.common import bench_ms, environment, warm_up_gpu, write_json


def _hf_rope_fns():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    )
    return LlamaRotaryEmbedding(cfg).cuda(), apply_rotary_pos_emb


ROPE_SHAPE = (2, 4096, 32, 8, 128)  # B, S, query heads, key heads, head_dim


def rope_inputs():
    """The RoPE benchmarks' inputs: shape, HF's rotary module and apply function, FP32 inv_freq,
    positions, q/k as (B, S, H*D) projections (BF16) and output gradients as (B, H, S, D)."""
    B, S, Hq, Hk, D = ROPE_SHAPE
    rotary, hf_apply = _hf_rope_fns()
    pos = torch.arange(S, device="cuda").view(1, S)
    q_lin = torch.randn(B, S, Hq * D, device="cuda", dtype=torch.bfloat16)
    k_lin = torch.randn(B, S, Hk * D, device="cuda", dtype=torch.bfloat16)
    gq = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16)
    gk = torch.randn(B, Hk, S, D, device="cuda", dtype=torch.bfloat16)
    return ROPE_SHAPE, rotary, hf_apply, rotary.inv_freq.float(), pos, q_lin, k_lin, gq, gk


def bench_rope(sweep: bool = True, rep_ms: float = 100, layers: int = 8) -> list[dict]:
    """Three views of fwd+bwd, because one backward() call has a fixed cost on its own:

    - ``fwd_bwd_ms``: one RoPE, one ``backward()`` call: what a microbenchmark usually shows.
      CUDA autograd runs the backward on its device thread; handing a Python ``autograd.Function``
      backward to that thread costs ~0.3 ms of host time per ``backward()`` call on the H100 box
      (measured: 0.68 ms vs 0.35 ms with the backward on the calling thread), more than our two
      kernels take, so this view measures the thread hand-off rather than RoPE.
    - ``fwd_bwd_ms_calling_thread``: the same with ``torch.autograd.set_multithreading_enabled(False)``.
    - ``per_layer_fwd_bwd_ms``: ``layers`` RoPEs chained in one graph and one ``backward()``, divided
      by ``layers``: what each decoder layer pays in training, where one step has one backward()
      call. HF and Liger compute cos/sin once for all layers (as HF's model does); we recompute
      them inside every kernel.
    """
    from hf_fp8.integrations.rope import fp32_rope

    (B, S, Hq, Hk, D), rotary, hf_apply, inv_freq, pos, q_lin, k_lin, gq, gk = rope_inputs()

    # every provider: (prepare(q) -> per-step context, step(q4, k4, ctx) -> (q4, k4)) on (B, S, H, D) views
    def hf_prepare(q):
        return rotary(q, pos)

    def hf_step(q4, k4, cs):
        qo, ko = hf_apply(q4.transpose(1, 2), k4.transpose(1, 2), *cs)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    def ours_step(q4, k4, _):
        return fp32_rope(q4, k4, pos, inv_freq)

    providers = {"hf_eager": (hf_prepare, hf_step), "hf_fp8": (lambda q: None, ours_step)}
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        def liger_step(q4, k4, cs):
            # Liger writes into its inputs when they are contiguous: give it fresh ones
            qo, ko = liger_rotary_pos_emb(q4.transpose(1, 2).contiguous(), k4.transpose(1, 2).contiguous(), *cs)
            return qo.transpose(1, 2), ko.transpose(1, 2)

        providers["liger"] = (hf_prepare, liger_step)
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", e)

    def chain(prepare, step, n):
        def fn(q, k):
            ctx = prepare(q)
            q4, k4 = q.view(B, S, Hq, D), k.view(B, S, Hk, D)
            for _ in range(n):
                q4, k4 = step(q4, k4, ctx)
            return q4.transpose(1, 2), k4.transpose(1, 2)

        return fn

    def fwd_bwd(fn, single_thread=False):
        def run():
            q = q_lin.detach().requires_grad_()
            k = k_lin.detach().requires_grad_()
            qo, ko = fn(q, k)
            with torch.autograd.set_multithreading_enabled(not single_thread):
                torch.autograd.backward([qo, ko], [gq, gk])

        return run

    # exact reference: float64 rotation by the model's FP32 angle
    angle = (pos.float()[..., None] * inv_freq).double()  # (1, S, D/2)
    c, s = angle.cos()[:, None], angle.sin()[:, None]

    def exact(x):
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    ref_q = exact(q_lin.view(B, S, Hq, D).transpose(1, 2))
    rows = []
    for name, (prepare, step) in providers.items():
        one = chain(prepare, step, 1)
        many = chain(prepare, step, layers)
        qo, ko = one(q_lin, k_lin)
        correct = (qo == ref_q.to(torch.float32).to(torch.bfloat16)).float().mean().item()
        err = ((qo.double() - ref_q).norm() / ref_q.norm()).item()
        rows.append(
            dict(
                op="rope",
                provider=name,
                fwd_ms=bench_ms(lambda one=one: one(q_lin, k_lin), rep_ms=rep_ms)["ms"],
                fwd_bwd_ms=bench_ms(fwd_bwd(one), rep_ms=rep_ms)["ms"],
                fwd_bwd_ms_calling_thread=bench_ms(fwd_bwd(one, single_thread=True), rep_ms=rep_ms)["ms"],
                layers=layers,
                per_layer_fwd_ms=bench_ms(lambda many=many: many(q_lin, k_lin), rep_ms=rep_ms)["ms"] / layers,
                per_layer_fwd_bwd_ms=bench_ms(fwd_bwd(many), rep_ms=rep_ms)["ms"] / layers,
                device_fwd_bwd_ms=bench_ms(fwd_bwd(one), cudagraph=True)["ms"],
                frac_correctly_rounded=correct,
                rel_err=err,
            )
        )
    # launch-shape sweep of our kernel (BLOCK_S tokens, HEADS per program, num_warps)
    from hf_fp8.kernels import rope as rope_kernels

    default = rope_kernels.TUNING["gpu"]
    ours_many = chain(lambda q: None, ours_step, layers)
    for cfg in [(16, 40, 4), (32, 8, 4), (64, 8, 4), (32, 4, 4), (64, 4, 8), (128, 8, 8)] if sweep else []:
        rope_kernels.TUNING["gpu"] = cfg
        rows.append(
            dict(
                op="rope_sweep",
                config=list(cfg),
                per_layer_fwd_bwd_ms=bench_ms(fwd_bwd(ours_many))["ms"] / layers,
                device_fwd_bwd_ms=bench_ms(fwd_bwd(chain(lambda q: None, ours_step, 1)), cudagraph=True)["ms"],
            )
        )
        print(f"rope sweep {cfg}: {rows[-1]}", flush=True)
    rope_kernels.TUNING["gpu"] = default
    base = next(r for r in rows if r["provider"] == "hf_eager")
    for r in rows:
        if r["op"] != "rope":
            continue
        for key in (
            "fwd_ms",
            "fwd_bwd_ms",
            "fwd_bwd_ms_calling_thread",
            "per_layer_fwd_ms",
            "per_layer_fwd_bwd_ms",
            "device_fwd_bwd_ms",
        ):
            r[key.replace("_ms", "") + "_speedup_vs_hf"] = base[key] / r[key]
        print(
            f"rope {r['provider']:9s} fwd {r['fwd_ms']:.3f}  fwd+bwd {r['fwd_bwd_ms']:.3f} "
            f"(calling thread {r['fwd_bwd_ms_calling_thread']:.3f}, per layer of {layers} "
            f"{r['per_layer_fwd_bwd_ms']:.3f}, device {r['device_fwd_bwd_ms']:.3f}) ms  "
            f"x{r['per_layer_fwd_bwd_speedup_vs_hf']:.2f} per layer vs HF  "
            f"correctly rounded {r['frac_correctly_rounded']:.4f}",
            flush=True,
        )
    return rows


def _peak_bytes_and_time(step) -> tuple[int, dict]:
    """(memory ``step`` allocates at its peak beyond what was allocated before, its bench_ms);
    ``step`` has run once already (compiled kernels, cached allocations)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base_mem, bench_ms(step)


def bench_loss() -> list[dict]:
    import hf_fp8

    B, S, H, V = 2, 4096, 4096, 128256
    torch.manual_seed(0)
    hidden0 = torch.randn(B, S, H, device="cuda", dtype=torch.bfloat16)
    weight0 = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, S), device="cuda")

    def hf(h, w):
        from transformers.loss.loss_utils import ForCausalLMLoss

        logits = h @ w.t()
        return ForCausalLMLoss(logits, labels, vocab_size=V)

    def ours(h, w):
        return hf_fp8.chunked_linear_cross_entropy(h, w, labels)

    providers = {"hf_bf16": hf, "hf_fp8": ours}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w):
            shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            return liger_fused_linear_cross_entropy(h.reshape(-1, H), w, shift.reshape(-1), ignore_index=-100)

        providers["liger"] = liger
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", e)

    # float64 reference loss on a slice (the full float64 logits would not fit)
    rows = []
    for name, fn in providers.items():

        def step(fn=fn):
            h = hidden0.detach().requires_grad_()
            w = weight0.detach().requires_grad_()
            loss = fn(h, w)
            loss.backward()
            return loss

        loss = step().item()
        peak, t = _peak_bytes_and_time(step)
        rows.append(dict(op="loss", provider=name, fwd_bwd_ms=t["ms"], peak_mem_gb=peak / 1e9, loss=loss))
        print(f"loss {name:9s} fwd+bwd {t['ms']:.2f} ms  peak {peak / 1e9:.2f} GB  loss {loss:.6f}", flush=True)
    ref = next(r for r in rows if r["provider"] == "hf_bf16")
    for r in rows:
        r["time_vs_hf"] = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"]
        r["mem_vs_hf"] = r["peak_mem_gb"] / ref["peak_mem_gb"]
    return rows


def bench_loss_blocks() -> list[dict]:
    """hf_fp8's loss at Llama-3-8B's lm_head (B=2, S=4096, vocab 128256) for chunk / gradient-block
    sizes, and the two weight-gradient GEMM forms it chooses between (one GEMM over all tokens;
    per-block GEMMs accumulated into the BF16 gradient)."""
    import hf_fp8

    B, S, H, V = 2, 4096, 4096, 128256
    N = B * S
    torch.manual_seed(0)
    hidden0 = torch.randn(B, S, H, device="cuda", dtype=torch.bfloat16)
    weight0 = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, S), device="cuda")
    rows = []
    for chunk, block in [
        (512, N),
        (256, N),
        (1024, N),
        (256, 1024),
        (512, 1024),
        (512, 2048),
        (1024, 2048),
        (2048, 2048),
        (1024, 1024),  # the default since 2026-11-24: one GEMM per buffer
        (768, 768),
    ]:

        def step(chunk=chunk, block=block):
            h = hidden0.detach().requires_grad_()
            w = weight0.detach().requires_grad_()
            loss = hf_fp8.chunked_linear_cross_entropy(h, w, labels, chunk_size=chunk, grad_block_size=block)
            loss.backward()
            return loss

        step()
        peak, t = _peak_bytes_and_time(step)
        rows.append(dict(op="loss_blocks", chunk=chunk, block=block, fwd_bwd_ms=t["ms"], peak_mem_gb=peak / 1e9))
        print(f"loss chunk {chunk:5d} block {block:5d}: {t['ms']:.2f} ms  peak {peak / 1e9:.2f} GB", flush=True)
    g = (torch.randn(N, V, device="cuda") * 1e-3).to(torch.bfloat16)
    h = hidden0.reshape(N, H)
    for block in (N, 2048, 1024):

        def dw(block=block):
            out = None
            for s in range(0, N, block):
                gb, hb = g[s : s + block], h[s : s + block]
                out = gb.t() @ hb if out is None else out.addmm_(gb.t(), hb)
            return out

        t = bench_ms(dw)
        rows.append(dict(op="weight_grad_gemm", block=block, ms=t["ms"], tflops=2 * N * H * V / t["ms"] / 1e9))
        print(f"dW GEMM in blocks of {block:5d}: {t['ms']:.2f} ms ({rows[-1]['tflops']:.0f} TFLOP/s)", flush=True)
    w_t = weight0.t()
    for chunk in (128, 256, 512, 640, 768, 1024, 2048):
        # token-major (chunk, V), what the CE kernel reads now; vocab-major (V, chunk) = W @ h_chunkᵀ
        def logits(chunk=chunk):
            for s in range(0, N, chunk):
                torch.mm(h[s : s + chunk], w_t, out_dtype=torch.float32)

        def logits_vmajor(chunk=chunk):
            for s in range(0, N, chunk):
                torch.mm(weight0, h[s : s + chunk].t(), out_dtype=torch.float32)

        for op, fn in (("logits_gemm_fp32_out", logits), ("logits_gemm_fp32_out_vocab_major", logits_vmajor)):
            t = bench_ms(fn)
            rows.append(dict(op=op, chunk=chunk, ms=t["ms"], tflops=2 * N * H * V / t["ms"] / 1e9))
            print(f"{op} in chunks of {chunk:5d}: {t['ms']:.2f} ms ({rows[-1]['tflops']:.0f} TFLOP/s)", flush=True)
    t = bench_ms(lambda: h @ w_t)
    rows.append(dict(op="logits_gemm_bf16_out_whole", chunk=N, ms=t["ms"], tflops=2 * N * H * V / t["ms"] / 1e9))
    for block in (1024, 2048, N):

        def dh(block=block):
            for s in range(0, N, block):
                g[s : s + block] @ weight0

        t = bench_ms(dh)
        rows.append(dict(op="hidden_grad_gemm", block=block, ms=t["ms"], tflops=2 * N * H * V / t["ms"] / 1e9))
        print(f"dh GEMM in blocks of {block:5d}: {t['ms']:.2f} ms ({rows[-1]['tflops']:.0f} TFLOP/s)", flush=True)
    return rows


def bench_loss_in_place() -> list[dict]:
    """What writing the logits gradient over the logits costs, per 1024-token block at vocab 128256:
    the CE kernel out of place and in place (barriers after every block of columns, or after
    blocks 0, 1, 2, 4, ...), and the two gradient GEMMs reading a contiguous or a strided gradient."""
    import hf_fp8.kernels.cross_entropy as CE

    n, H, V = 1024, 4096, 128256
    torch.manual_seed(0)
    logits = torch.randn(n, V, device="cuda") * 4
    labels = torch.randint(0, V, (n,), device="cuda")
    scale = torch.tensor(1 / 8192, device="cuda")
    weight = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16)
    h = torch.randn(n, H, device="cuda").to(torch.bfloat16)
    rows, default = [], CE.IN_PLACE_BARRIERS
    out = torch.empty(n, V, device="cuda", dtype=torch.bfloat16)
    t = bench_ms(lambda: CE.ce_fwd_bwd(logits, labels, scale, torch.bfloat16, grad_out=out))
    rows.append(dict(op="ce_out_of_place", ms=t["ms"]))
    buf = logits.clone()
    for barriers in (1, 2):
        CE.IN_PLACE_BARRIERS = barriers
        # the buffer is overwritten by each call: re-fill it inside the timed call, and time the copy alone
        t = bench_ms(
            lambda: (
                buf.copy_(logits),
                CE.ce_fwd_bwd(buf, labels, scale, torch.bfloat16, grad_out=buf.view(torch.bfloat16)[:, :V]),
            )
        )
        rows.append(dict(op="ce_in_place_plus_refill", barriers=barriers, ms=t["ms"]))
    CE.IN_PLACE_BARRIERS = default
    t = bench_ms(lambda: buf.copy_(logits))
    rows.append(dict(op="refill_copy", ms=t["ms"]))
    strided = buf.view(torch.bfloat16)[:, :V]
    strided.copy_(out)
    for name, g in (("contiguous", out), ("strided", strided)):
        t = bench_ms(lambda g=g: g @ weight)
        rows.append(dict(op="hidden_grad_gemm_1024", layout=name, ms=t["ms"]))
        t = bench_ms(lambda g=g: g.t() @ h)
        rows.append(dict(op="weight_grad_gemm_1024", layout=name, ms=t["ms"]))
    # the hidden-state gradient transposed (dhᵀ = Wᵀ gᵀ) into columns of an (H, tokens) buffer
    dh_t = torch.empty(H, 8192, device="cuda", dtype=torch.bfloat16)
    for name, g in (("contiguous", out), ("strided", strided)):
        t = bench_ms(lambda g=g: torch.mm(weight.t(), g.t(), out=dh_t[:, :n]))
        rows.append(dict(op="hidden_grad_gemm_1024_transposed_out", layout=name, ms=t["ms"]))
    for r in rows:
        print(r, flush=True)
    return rows


def bench_adamw() -> list[dict]:
    import hf_fp8

    shapes = [
        (4096, 4096),
        (1024, 4096),
        (1024, 4096),
        (4096, 4096),
        (14336, 4096),
        (14336, 4096),
        (4096, 14336),
        (4096,),
        (4096,),
    ] * 4
    rows = []

    def make(dtype):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        return ps

    n = sum(torch.Size(s).numel() for s in shapes)
    cases = {
        "torch_fused_bf16_params_bf16_states": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        "torch_fused_fp32_params_fp32_states": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        "hf_fp8_bf16_params_fp32_states_sr": (torch.bfloat16, lambda ps: hf_fp8.optim.AdamW(ps, lr=1e-4, seed=0)),
    }
    for name, (dtype, mk) in cases.items():
        ps = make(dtype)
        opt = mk(ps)
        opt.step()
        t = bench_ms(opt.step, warmup_ms=50, rep_ms=300)
        rows.append(dict(op="adamw", provider=name, params=n, step_ms=t["ms"]))
        print(f"adamw {name:40s} {t['ms']:.2f} ms for {n / 1e6:.0f}M params", flush=True)
        del ps, opt
        torch.cuda.empty_cache()
    ref = rows[0]["step_ms"]
    for r in rows:
        r["time_vs_torch_fused_bf16"] = r["step_ms"] / ref
    return rows


def main() -> None:
    sections = sys.argv[1:] or ["rope", "loss", "adamw"]
    warm_up_gpu()
    rows = []
    for s in sections:
        try:
            rows += {
                "rope": bench_rope,
                "rope-final": lambda: bench_rope(sweep=False, rep_ms=500),  # no sweep, 5x the repeats
                "loss": bench_loss,
                "loss-blocks": bench_loss_blocks,
                "loss-in-place": bench_loss_in_place,
                "adamw": bench_adamw,
            }[s]()
        except Exception as e:  # noqa: BLE001  a failed section is a result too
            import traceback

            traceback.print_exc()
            rows.append(dict(op=s, error=f"{type(e).__name__}: {str(e)[:300]}"))
    # RoPE alone goes to its own file (README's RoPE table), loss/AdamW to precision_ops_h100.json
    name = "rope_h100.json" if all(s.startswith("rope") for s in sections) else "precision_ops_h100.json"
    name = "loss_blocks_h100.json" if sections == ["loss-blocks"] else name
    name = "loss_in_place_h100.json" if sections == ["loss-in-place"] else name
    print(f"wrote {write_json(name, {'env': environment(), 'rows': rows})}")


if __name__ == "__main__":
    main()
