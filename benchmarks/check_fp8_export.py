"""Does an hf_fp8 FP8 export load with transformers' own FP8 quantizer on the GPU and generate
the same greedy tokens as the dequantized model?

    python -m benchmarks.check_fp8_export

A small Llama (hidden 512, 4 layers) is first trained in FP8 on GPU for a few hundred steps
on a fixed random bigram chain, so its next-token choices are decided (a random-weight
model's near-flat logits would let any rounding flip a greedy token). Then
``hf_fp8.save_fp8`` -> ``AutoModelForCausalLM.from_pretrained(dir)`` (transformers' FP8
quantizer: FP8 weights, 128x128 block scales, dynamically quantized activations) and
``hf_fp8.load_fp8(dir)`` (weights dequantized to BF16, stock linear layers) each generate
greedily from the same prompts.

transformers 5.x runs its FP8 matmul with a Triton kernel it downloads from the HF Hub
(``kernels-community/finegrained-fp8`` through the ``kernels`` package); where that cannot be
had (an offline machine), the quantized model still loads, its FP8 weights and scales are
compared with the file bit for bit, and the generation comparison uses transformers' own
dequantizing load (``FineGrainedFP8Config(dequantize=True)``) instead, with the reason recorded.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import environment, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    from llama_fixtures import bigram_batches, tiny_llama_config
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import hf_fp8

    V = 1024
    cfg = tiny_llama_config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=V,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batches = bigram_batches(32, 64, V, seed=0)
    for _ in range(400):
        ids = next(batches).cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained: loss {loss.item():.3f}", flush=True)
    prompts = next(bigram_batches(8, 8, V, seed=1)).cuda()
    out = {"train_loss": loss.item()}
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        hf_fp8.save_fp8(model, d)
        from safetensors.torch import load_file
        from transformers import FineGrainedFP8Config

        saved = load_file(f"{d}/model.safetensors")
        quant = AutoModelForCausalLM.from_pretrained(d, device_map="cuda").eval()
        fp8_modules = sorted(
            {f"{type(m).__module__}.{type(m).__name__}" for m in quant.modules() if "fp8" in type(m).__name__.lower()}
        )
        same_bits = all(
            torch.equal(
                t.cpu().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.cpu(),
                saved[k].view(torch.uint8) if saved[k].dtype == torch.float8_e4m3fn else saved[k],
            )
            for k, t in quant.state_dict().items()
            if k in saved and ("weight" in k)
        )
        w = quant.model.layers[0].mlp.up_proj.weight
        out.update(
            transformers_fp8_modules=fp8_modules,
            quantized_weight_dtype=str(w.dtype),
            weights_and_scales_bit_equal_to_file=same_bits,
        )
        print("transformers loaded:", fp8_modules, w.dtype, "bit-equal to file:", same_bits, flush=True)
        deq, _ = hf_fp8.load_fp8(d, None, device="cuda")
        deq.eval()
        b = deq.generate(prompts, **kw)
        lb = deq(input_ids=prompts).logits.float()
        try:
            a = quant.generate(prompts, **kw)
            la = quant(input_ids=prompts).logits.float()
            out["transformers_path"] = "FP8 matmul (transformers' finegrained-fp8 kernel)"
        except ImportError as e:
            out["fp8_matmul_unavailable"] = str(e)[:300]
            deq_t = AutoModelForCausalLM.from_pretrained(
                d, device_map="cuda", quantization_config=FineGrainedFP8Config(dequantize=True)
            ).eval()
            a = deq_t.generate(prompts, **kw)
            la = deq_t(input_ids=prompts).logits.float()
            out["transformers_path"] = "FineGrainedFP8Config(dequantize=True): transformers' own dequantization"
            out["max_weight_diff_vs_hf_fp8_dequant"] = max(
                (deq_t.get_submodule(n).weight.float() - m.weight.float()).abs().max().item()
                for n, m in deq.named_modules()
                if isinstance(m, torch.nn.Linear)
            )
    same = (a == b).all(dim=1)
    out.update(
        prompts=prompts.shape[0],
        new_tokens=24,
        sequences_identical=int(same.sum()),
        token_agreement=(a[:, 8:] == b[:, 8:]).float().mean().item(),
        logits_rel_diff=((la - lb).norm() / lb.norm()).item(),
    )
    print(out, flush=True)
    write_json("fp8_export_h100.json", {"env": environment(), **out})


if __name__ == "__main__":
    main()
