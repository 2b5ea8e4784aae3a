#!/usr/bin/env bash
# What the H100 proves, by named step (each backs a claim in README.md or benchmarks/README.md):
#   tests e2e loss full8b padded families blockwise linear sweep quant attention lora adamw scaling
# Usage (from the repo root on the GPU machine): bash benchmarks/run_gpu.sh [step ...] (default: tests e2e loss)
# Set HF_FP8_GIT_SHA=<the commit sent> from the calling machine: the copy there may carry a stale .git.
set -u
export PYTHONUNBUFFERED=1 HF_FP8_TEST_GPU=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Run from the repo root: hf_fp8/kernels and hf_fp8/integrations link to the top-level folders.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
steps=${*:-tests e2e loss}
iso="python3 -m benchmarks.bench_llama --isolate"
show() { grep -v Warning | grep -E "^(1b|8b|qwen|mistral)|skipped|Error|error|Traceback|fault|loss" | cut -c1-260; }
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    # every GPU test (kernels bit-exact against their references, _scaled_mm against the emulation, the integrations)
    tests) python3 -m pytest -m gpu tests/test_gpu.py tests/test_monitor.py tests/test_examples.py tests/test_trainer.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -30 ;;
    # the README's performance table: 8 layers of Llama-3-8B, B=2, S=4096, each variant in its own process
    e2e) $iso --budget-s 560 --out llama_e2e_h100.json 2>&1 | show ;;
    # FP8 loss against BF16 (the same AdamW): Llama-3.2-1B shapes, every decoder linear in FP8 (the size
    # filter keeps them all in BF16 at this size), 300 steps of the bigram stream, three seeds (about
    # 10 minutes; SEEDS="1 2" runs a part, for machines that cut a command at 10 minutes)
    loss) $iso --configs 1b --steps 300 --warmup 3 --loss-window 50 --seeds ${SEEDS:-0 1 2} --budget-s 900 --out llama_1b_loss_h100.json --variants stock_bf16_hfadamw hf_fp8_all hf_fp8_tensorwise_all 2>&1 | show ;;
    # the whole Llama-3-8B on one GPU: B=1, S=4096, activation checkpointing (hf_fp8's selective
    # recompute, keep_activations="auto", and every layer recomputed as transformers does)
    full8b) $iso --configs 8b-full --batch 1 --checkpointing --budget-s 560 --out llama_8b_full_ckpt_h100.json --variants stock_bf16 hf_fp8 hf_fp8_recomputeall torchao_tensorwise_compile liger 2>&1 | show ;;
    # padded SFT batches (25% padding) on the whole 8B: FP8 attention (with the padding mask) against SDPA
    padded) $iso --configs 8b-full --batch 1 --checkpointing --pad-frac 0.25 --budget-s 560 --out llama_8b_full_ckpt_padded_h100.json --variants stock_bf16 hf_fp8_fp8attn hf_fp8 torchao_tensorwise_compile liger 2>&1 | show ;;
    # the model families: 8 layers of Llama-3-8B, Qwen2.5-7B, Qwen3-8B and Mistral-7B, B=2, S=4096
    families) $iso --configs 8b qwen2.5-7b qwen3-8b mistral-7b --budget-s 560 --out families_h100.json --variants stock_bf16 hf_fp8 torchao_tensorwise_compile 2>&1 | show ;;
    # the blockwise recipe against the per-tensor ones: speed (8 layers of Llama-3-8B) and loss
    # against BF16 (Llama-3.2-1B shapes, every decoder linear in FP8, 300 steps)
    blockwise) $iso --configs 8b --budget-s 250 --out blockwise_e2e_h100.json --variants stock_bf16 hf_fp8 hf_fp8_tensorwise hf_fp8_blockwise torchao_tensorwise_compile 2>&1 | show
      $iso --configs 1b --steps 300 --warmup 3 --loss-window 50 --budget-s 300 --out blockwise_1b_loss_h100.json --variants stock_bf16_hfadamw hf_fp8_all hf_fp8_tensorwise_all hf_fp8_blockwise_all 2>&1 | show ;;
    linear) python3 -m benchmarks.bench_linear --budget-s 230 2>&1 | grep -v Warning | tail -40 ;;
    sweep) python3 -m benchmarks.bench_linear --sweep --budget-s 150 2>&1 | tail -60 ;;
    quant) python3 -m benchmarks.bench_quant --sweep-blocks 2>&1 | tail -40 ;;
    attention) python3 -m benchmarks.bench_attention 2>&1 | grep -v Warning | tail -30 ;;
    lora) python3 -m benchmarks.bench_lora 2>&1 | grep -v Warning | tail -12
      python3 -m benchmarks.bench_lora --variants stock_bf16_lora published_fp8_lora_dequant published_fp8_lora_blockwise --out lora_published_h100.json 2>&1 | grep -v Warning | tail -6 ;;
    adamw) python3 -m benchmarks.bench_adamw --sweep 2>&1 | grep -v Warning | cut -c1-260 | tail -30 ;;
    scaling) torchrun --nproc-per-node "${NGPU:-1}" -m benchmarks.bench_scaling 2>&1 | grep -v Warning | tail -12 ;;
    *) echo "unknown step $s (tests e2e loss full8b padded families blockwise linear sweep quant attention lora adamw scaling)" ;;
  esac
done
echo "=== done $(date +%T)"
