#!/usr/bin/env bash
# Everything the H100 has to prove, in one call of the device tool:
#   GPU tests, quantization-kernel bandwidth, Fp8Linear vs BF16 vs torchao, the auto-filter sweep.
# Usage (from the repo root on the GPU machine): bash benchmarks/run_gpu.sh [tests|quant|linear|sweep ...]
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
steps=${*:-tests quant linear sweep}
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    tests) python3 -m pytest -m gpu tests/test_gpu.py tests/test_monitor.py tests/test_examples.py tests/test_trainer.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -30 ;;
    compiletest) python3 -m pytest -m gpu tests/test_gpu.py -k compile -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-600 | tail -30 ;;
    quant) python3 -m benchmarks.bench_quant --sweep-blocks 2>&1 | tail -60 ;;
    linear) python3 -m benchmarks.bench_linear --budget-s 230 2>&1 | grep -v Warning | tail -80 ;;
    sweep) python3 -m benchmarks.bench_linear --sweep --budget-s 150 2>&1 | tail -150 ;;
    profile) python3 -m benchmarks.profile_linear 2>&1 | grep -v "^-" | cut -c1-150 | tail -70 ;;
    rope) python3 -m benchmarks.bench_precision_ops rope-final 2>&1 | grep -v Warning | tail -12 ;;
    lora) python3 -m benchmarks.bench_lora 2>&1 | grep -v Warning | tail -12 ;;
    export) python3 -m benchmarks.check_fp8_export 2>&1 | grep -v Warning | tail -25 ;;
    attention) python3 -m benchmarks.bench_attention 2>&1 | grep -v Warning | tail -30 ;;
    llama) python3 -m benchmarks.bench_llama --budget-s 420 2>&1 | grep -v Warning | tail -30 ;;
    scaling1) torchrun --nproc-per-node 1 -m benchmarks.bench_scaling --layers 2 --steps 3 --warmup 1 2>&1 | grep -v Warning | tail -8 ;;
    llamafused) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_tensorwise hf_fp8_delayed hf_fp8_delayed_fp8attn_all torchao_tensorwise_compile --budget-s 300 --out llama_fused_h100.json 2>&1 | grep -E "^8b" | cut -c1-330 ;;
    llamae2e) python3 -m benchmarks.bench_llama --budget-s 500 --out llama_e2e_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llamamlp) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_tensorwise hf_fp8_tensorwise_unfusedmlp hf_fp8_delayed hf_fp8_delayed_unfusedmlp hf_fp8_delayed_recast hf_fp8_delayed_fp8attn_all torchao_tensorwise_compile --budget-s 420 --out llama_mlp_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llamanow) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_tensorwise hf_fp8_delayed hf_fp8_delayed_jitlaunch_percast hf_fp8_delayed_fp8attn_all hf_fp8_delayed_fp8attn_all_jitlaunch_percast hf_fp8_tensorwise_fp8attn_all hf_fp8_delayed_fp8attn_all_recast torchao_tensorwise_compile --budget-s 540 --out llama_now_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llamaprofilenow) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed hf_fp8_delayed_fp8attn_all --out llama_profile_now_h100.json 2>&1 | grep -v Warning | cut -c1-400 | tail -40 ;;
    llamafinal) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_tensorwise hf_fp8_tensorwise_all hf_fp8_delayed hf_fp8_delayed_savedwt hf_fp8_delayed_all hf_fp8_delayed_all_savedwt hf_fp8_delayed_fp8attn_all hf_fp8_full_bf16 bf16_compile torchao_tensorwise_compile liger --budget-s 560 --out llama_e2e_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llamaprofilebest) python3 -m benchmarks.profile_llama --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_all torchao_tensorwise_compile 2>&1 | grep -v Warning | cut -c1-400 | grep -v "^ " | tail -20 ;;
    llama1bnow) python3 -m benchmarks.bench_llama --configs 1b --budget-s 300 --out llama_1b_now_h100.json --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_all hf_fp8_tensorwise_all liger 2>&1 | grep -E "^1b|skipped|Error" | cut -c1-330 ;;
    llamacheck) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_all hf_fp8_tensorwise_all hf_fp8_delayed_all_savedwt torchao_tensorwise_compile --budget-s 300 --out llama_final_check_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    casttranspose) python3 -m benchmarks.bench_cast_transpose 2>&1 | grep -v Warning | tail -150 ;;
    llamacastloss) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_oldcast_chunk512 hf_fp8_tensorwise torchao_tensorwise_compile --budget-s 330 --out llama_cast_loss_h100.json 2>&1 | grep -E "^8b|skipped|Error|error" | cut -c1-330 ;;
    lossinplace) python3 -m benchmarks.bench_precision_ops loss-in-place 2>&1 | grep -v Warning | tail -12 ;;
    llamaall) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_tensorwise hf_fp8_delayed hf_fp8_delayed_savedwt hf_fp8_rowwise hf_fp8_delayed_fp8attn hf_fp8_delayed_fp8attn_all hf_fp8_full_bf16 hf_fp8_delayed_compile bf16_compile torchao_tensorwise torchao_tensorwise_compile torchao_rowwise_compile liger --budget-s 540 --out llama_e2e_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    llamapeers) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_delayed hf_fp8_tensorwise torchao_tensorwise_compile torchao_rowwise_compile liger --budget-s 400 --out llama_peers_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|Killed|fault|memory" | cut -c1-200 ;;
    llama1bcastloss) python3 -m benchmarks.bench_llama --configs 1b --isolate --variants stock_bf16 hf_fp8_delayed_all hf_fp8_delayed_all_oldcast_chunk512 hf_fp8_delayed_graph hf_fp8_delayed_graph_oldcast_chunk512 --budget-s 400 --out llama_1b_cast_loss_h100.json 2>&1 | grep -v Warning | grep -E "^1b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    cachetests) python3 -m pytest tests/test_loss.py tests/test_compile.py tests/test_hf_llama.py -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20
      python3 -m pytest -m gpu tests/test_gpu.py -k "loss or compile or llama or graph" -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20 ;;
    llamacache) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_hfcache hf_fp8_delayed_chunk2048_block2048 torchao_tensorwise_compile --budget-s 330 --out llama_cache_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-300 ;;
    gapprofile) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed torchao_tensorwise_compile --out llama_gaps_h100.json 2>&1 | grep -v Warning | cut -c1-300 | tail -40 ;;
    cpucheck) for off in 1 0; do  # two CPU tests on this machine's torch/transformers, with and without the cache stand-in
        python3 -c "import sys, pytest; import hf_fp8.integrations.loss as L; L.STORELESS_TRAINING_CACHE = bool($off); sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_loss.py::test_bf16_model_loss_closer_to_fp32_than_stock', 'tests/test_hf_llama.py::test_rowwise_training_tracks_fp32']))" 2>&1 | grep -E "passed|failed" ; done ;;
    gapprofile2) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed --steps 3 --out llama_gaps2_h100.json 2>&1 | grep -v Warning | cut -c1-900 | tail -30 ;;
    llamaaccept) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_tensorwise hf_fp8_delayed torchao_tensorwise_compile liger --budget-s 300 --out llama_accept_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-260 ;;
    normtests) python3 -m pytest -m gpu tests/test_gpu.py -k "norm or mlp or compile or llama or graph" -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20 ;;
    llamanorm) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_unfusednorm torchao_tensorwise_compile hf_fp8_delayed hf_fp8_delayed_unfusednorm hf_fp8_tensorwise hf_fp8_tensorwise_unfusednorm --budget-s 330 --out llama_norm_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-260 ;;
    normprofile) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed --out llama_profile_norm_h100.json 2>&1 | grep -v Warning | cut -c1-300 | head -24 ;;
    llamae2eA) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_tensorwise hf_fp8_rowwise hf_fp8_full_bf16 torchao_tensorwise torchao_tensorwise_compile torchao_rowwise_compile liger --budget-s 540 --out llama_e2e_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-230 ;;
    llamae2eB) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_unfusednorm hf_fp8_delayed_savedwt hf_fp8_delayed_fp8attn hf_fp8_delayed_fp8attn_all hf_fp8_delayed_compile bf16_compile --budget-s 380 --out llama_e2e_more_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-230 ;;
    adamwtests) python3 -m pytest -m gpu tests/test_gpu.py -k "adamw" -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20
      python3 -m pytest tests/test_optim.py -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20 ;;
    adamw) python3 -m benchmarks.bench_adamw --sweep 2>&1 | grep -v Warning | cut -c1-260 | tail -45 ;;
    llamaadamw) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_hfadamw torchao_tensorwise_compile torchao_tensorwise_compile_hfadamw hf_fp8_tensorwise_hfadamw stock_bf16_hfadamw --budget-s 400 --out llama_adamw_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-260 ;;
    adamwprofile) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed_hfadamw --out llama_profile_adamw_h100.json 2>&1 | grep -v Warning | cut -c1-300 | head -24 ;;
    hostlead) python3 -m benchmarks.profile_host_lead --variants hf_fp8_delayed_hfadamw hf_fp8_delayed torchao_tensorwise_compile 2>&1 | grep -v Warning | cut -c1-200 | tail -90 ;;
    hooktests) python3 -m pytest -m gpu tests/test_gpu.py -k "delayed or adamw or llama or graph or norm or mlp" -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20
      python3 -m pytest tests/test_delayed_update.py tests/test_optim.py -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20 ;;
    hostleadnow) python3 -m benchmarks.profile_host_lead --variants hf_fp8_delayed_hfadamw --out llama_host_lead_now_h100.json 2>&1 | grep -E "step start|layer 0|layer 1 start|forward end|backward end|optimizer end" | cut -c1-200 ;;
    llamahook) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_hfadamw torchao_tensorwise_compile hf_fp8_tensorwise_hfadamw hf_fp8_delayed_hfadamw --budget-s 330 --out llama_hook_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-230 ;;
    llamafinal2) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_torchadamw hf_fp8_tensorwise hf_fp8_rowwise hf_fp8_full_bf16 torchao_tensorwise torchao_tensorwise_compile torchao_tensorwise_compile_hfadamw torchao_rowwise_compile liger --budget-s 560 --out llama_e2e_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-230 ;;
    trainertests) python3 -m pytest -m gpu tests/test_trainer.py tests/test_gpu.py -k "trainer or adamw" -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20 ;;
    llamarepeat) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 420 --out llama_accept_repeat_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    llamaclose) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 420 --out llama_accept_close_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    hostpython) python3 -m benchmarks.profile_host_python 2>&1 | grep -v Warning | cut -c1-170 | tail -120 ;;
    llamafastacc) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_fastacc torchao_tensorwise_compile hf_fp8_delayed_fastacc hf_fp8_delayed torchao_tensorwise_compile --budget-s 480 --out llama_fastacc_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    llamaresemb) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_noresgrad_torchemb torchao_tensorwise_compile hf_fp8_delayed_noresgrad_torchemb hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 540 --out llama_resemb_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    resembprofile) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed hf_fp8_delayed_noresgrad_torchemb --out llama_profile_resemb_h100.json 2>&1 | grep -v Warning | cut -c1-300 | head -30 ;;
    llamaclose2) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 420 --out llama_accept_close2_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    gemmshapes) python3 -m benchmarks.bench_gemm_shapes 2>&1 | grep -v Warning | tail -25 ;;
    llamagraphnow) python3 -m benchmarks.bench_llama --isolate --variants hf_fp8_delayed hf_fp8_delayed_graph torchao_tensorwise_compile hf_fp8_delayed_graph hf_fp8_delayed --budget-s 420 --out llama_graph_now_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    hostpythonnow) python3 -m benchmarks.profile_host_python --variants hf_fp8_delayed --out host_python_now_h100.json 2>&1 | grep -v Warning | cut -c1-170 | grep -E "forward_host|hf_fp8_delayed" | head -8 ;;
    # interleaved against an older tree: scratch/base = that commit laid out as below (see benchmarks/bench_llama_ab.py)
    llamaab) python3 -m benchmarks.bench_llama_ab --base scratch/base --base-sha "${HF_FP8_BASE_SHA:-unknown}" --out llama_ab_host_h100.json 2>&1 | grep -v Warning | cut -c1-260 ;;
    llamaab1b) python3 -m benchmarks.bench_llama_ab --base scratch/base --base-sha "${HF_FP8_BASE_SHA:-unknown}" --configs 1b --peers stock_bf16 --out llama_ab_host_1b_h100.json 2>&1 | grep -v Warning | cut -c1-260 ;;
    llamaend) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 420 --out llama_accept_end_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    llamaend2) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 420 --out llama_accept_end2_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    hostleadend) python3 -m benchmarks.profile_host_lead --variants hf_fp8_delayed --out llama_host_lead_end_h100.json 2>&1 | grep -E "FP8 layers|step start|layer 0|layer 1 start|forward end|backward end|optimizer end" | cut -c1-200 ;;
    gemmcalls) python3 -m benchmarks.profile_gemm_calls 2>&1 | grep -v Warning | tail -14 ;;
    quantnow) python3 -m benchmarks.bench_quant 2>&1 | tail -40 ;;
    lossblocks) python3 -m benchmarks.bench_precision_ops loss-blocks 2>&1 | grep -v Warning | tail -20 ;;
    llamalean) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_delayed_all hf_fp8_delayed_all_wholeloss hf_fp8_delayed_all_wholeloss_keptact hf_fp8_delayed_all_chunk512_block2048 hf_fp8_delayed_all_chunk512_block1024 hf_fp8_delayed hf_fp8_tensorwise_all torchao_tensorwise_compile --budget-s 440 --out llama_lean_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    memprofile) python3 -m benchmarks.profile_memory --variants stock_bf16 hf_fp8_delayed_all hf_fp8_delayed_all_wholeloss_keptact 2>&1 | grep -v Warning | tail -40 ;;
    memnow) python3 -m benchmarks.profile_memory --variants hf_fp8_delayed_all --out memory_profile_now_h100.json 2>&1 | grep -v Warning | tail -12 ;;
    llamamem) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_delayed_all hf_fp8_delayed_all_savedoproj hf_fp8_delayed_all_wholeloss_keptact_savedoproj hf_fp8_delayed torchao_tensorwise_compile --budget-s 400 --out llama_mem_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llamalast) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_tensorwise hf_fp8_tensorwise_all hf_fp8_delayed hf_fp8_delayed_all hf_fp8_delayed_all_savedwt hf_fp8_delayed_all_wholeloss_keptact_savedoproj hf_fp8_delayed_fp8attn_all hf_fp8_full_bf16 bf16_compile torchao_tensorwise_compile liger --budget-s 540 --out llama_e2e_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llamagroups) python3 -m benchmarks.bench_llama --configs 1b 8b --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_all hf_fp8_delayed_mlponly hf_fp8_delayed_attnonly --budget-s 400 --out llama_groups_h100.json 2>&1 | grep -E "^(1b|8b)|skipped|Error" | cut -c1-300 ;;
    llamagroups2) python3 -m benchmarks.bench_llama --configs 1b 8b --variants stock_bf16 hf_fp8_delayed_nofp8 hf_fp8_delayed_all hf_fp8_delayed_mlponly hf_fp8_delayed_attnonly hf_fp8_tensorwise_nofp8 hf_fp8_tensorwise_all hf_fp8_tensorwise_mlponly hf_fp8_tensorwise_attnonly --budget-s 480 --out llama_groups_h100.json 2>&1 | grep -E "^(1b|8b)|skipped|Error" | cut -c1-200 ;;
    graphtest) python3 -m pytest -m gpu tests/test_gpu.py tests/test_examples.py tests/test_trainer.py -k cuda_graph -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-400 | tail -30 ;;
    llamagraph) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_graph hf_fp8_delayed_fastacc hf_fp8_tensorwise hf_fp8_tensorwise_graph torchao_tensorwise_compile stock_bf16_graph --budget-s 330 --out llama_graph_h100.json 2>&1 | grep -E "^8b|skipped|Error|error" | cut -c1-330 ;;
    llamagraph1b) python3 -m benchmarks.bench_llama --configs 1b --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_graph hf_fp8_tensorwise hf_fp8_tensorwise_graph hf_fp8_delayed_all stock_bf16_graph torchao_tensorwise_compile --budget-s 260 --out llama_graph_1b_h100.json 2>&1 | grep -E "^1b|skipped|Error|error" | cut -c1-330 ;;
    graphtrainer) python3 examples/finetune_trainer.py --fp8 delayed --fp8_cuda_graph --dataloader_drop_last --bf16 --max_steps 30 --output_dir /tmp/graphtrainer 2>&1 | grep -v Warning | tail -8 ;;
    graphexample) python3 examples/cuda_graph_step.py --steps 30 2>&1 | tail -6 ;;
    bf16trainer) python3 examples/finetune_trainer.py --fp8 delayed --dataloader_drop_last --bf16 --max_steps 30 --output_dir /tmp/bf16trainer 2>&1 | grep -v Warning | tail -4 ;;
    llamagroupsgraph) python3 -m benchmarks.bench_llama --configs 1b 8b --variants stock_bf16 hf_fp8_delayed_nofp8_graph hf_fp8_delayed_all_graph hf_fp8_delayed_mlponly_graph hf_fp8_delayed_attnonly_graph hf_fp8_tensorwise_nofp8_graph hf_fp8_tensorwise_all_graph hf_fp8_tensorwise_mlponly_graph hf_fp8_tensorwise_attnonly_graph --budget-s 480 --out llama_groups_graph_h100.json 2>&1 | grep -E "^(1b|8b)|skipped|Error" | cut -c1-200 ;;
    graphprofile) python3 -m benchmarks.profile_llama --variants stock_bf16_graph hf_fp8_delayed hf_fp8_delayed_graph --out llama_profile_graph_h100.json 2>&1 | grep -v Warning | cut -c1-600 | tail -60 ;;
    host) python3 -m benchmarks.profile_host 2>&1 | grep -v Warning | tail -20 ;;
    llamae2erepeat) python3 -m benchmarks.bench_llama --variants stock_bf16 hf_fp8_tensorwise hf_fp8_delayed hf_fp8_delayed_compile torchao_tensorwise_compile --steps 12 --budget-s 300 --out llama_e2e_repeat_h100.json 2>&1 | grep -E "^8b|skipped|Error" | cut -c1-330 ;;
    llama1b) python3 -m benchmarks.bench_llama --configs 1b --budget-s 400 --out llama_1b_h100.json --variants stock_bf16 hf_fp8_tensorwise hf_fp8_delayed hf_fp8_delayed_compile hf_fp8_full_bf16 bf16_compile torchao_tensorwise_compile torchao_rowwise_compile liger 2>&1 | grep -E "^1b|skipped|Error" | cut -c1-330 ;;
    llamaprofileall) python3 -m benchmarks.profile_llama --variants hf_fp8_delayed hf_fp8_delayed_fp8attn_all --out llama_profile_all_h100.json 2>&1 | grep -v Warning | cut -c1-400 | tail -40 ;;
    llamaprofile) python3 -m benchmarks.profile_llama 2>&1 | grep -v Warning | cut -c1-400 | tail -60 ;;
    precision) python3 -m benchmarks.bench_precision_ops 2>&1 | grep -v Warning | tail -30 ;;
    demo) python3 examples/quickstart.py --steps 20 2>&1 | tail -16 ;;
    ropeprofile) python3 -m benchmarks.profile_rope 2>&1 | grep -v Warning | cut -c1-200 | tail -60 ;;
    groupbwd) python3 -m benchmarks.bench_group_backward 2>&1 | grep -v Warning | tail -25 ;;
    hostwait) python3 -m benchmarks.bench_llama --isolate --variants hf_fp8_delayed hf_fp8_delayed_hostwait3 hf_fp8_delayed hf_fp8_delayed_hostwait3 --budget-s 300 --out llama_hostwait_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    prelude) python3 -m benchmarks.profile_host_lead --prelude --variants hf_fp8_delayed --out llama_host_prelude_h100.json 2>&1 | grep -v Warning | tail -40 ;;
    defer) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed hf_fp8_delayed_defer torchao_tensorwise_compile hf_fp8_delayed hf_fp8_delayed_defer torchao_tensorwise_compile hf_fp8_delayed_defer --budget-s 420 --out llama_defer_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-220
      python3 -m benchmarks.profile_host_lead --variants hf_fp8_delayed_defer --out llama_host_lead_defer_h100.json 2>&1 | grep -v Warning | grep -E "step start|layer 0|layer 1 |layer 2 |forward end|backward end|optimizer" ;;
    defertests) python3 -m pytest -m gpu tests/test_gpu.py -k "adamw or optim or defer" -q -p no:cacheprovider 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-300 | tail -20 ;;
    llamadefer) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed_nodefer --budget-s 480 --out llama_accept_defer_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-220 ;;
    llamadefer2) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed_nodefer hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed_nodefer hf_fp8_delayed torchao_tensorwise_compile --budget-s 520 --out llama_accept_defer2_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    llamadefer3) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed_nodefer hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed_nodefer hf_fp8_delayed torchao_tensorwise_compile --budget-s 520 --out llama_accept_defer3_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    llamaacceptfinal) python3 -m benchmarks.bench_llama --isolate --variants stock_bf16 hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile hf_fp8_delayed torchao_tensorwise_compile --budget-s 420 --out llama_accept_final_h100.json 2>&1 | grep -v Warning | grep -E "^8b|skipped|Error|error|Traceback|fault" | cut -c1-200 ;;
    quantsweep) python3 -m benchmarks.bench_quant --sweep-blocks --out quant_sweep_h100.json 2>&1 | tail -40 ;;
    monitor) python3 -m benchmarks.bench_monitor 2>&1 | grep -v Warning | tail -15 ;;
  esac
done
echo "=== done $(date +%T)"
