"""Full-BF16 fine-tuning: BF16 weights and gradients, FP32 RoPE, logits, loss and optimizer states.

    python examples/full_bf16.py                       # tiny Llama + public-domain text, CPU is fine
    python examples/full_bf16.py --model_name_or_path meta-llama/Llama-3.2-1B --max_steps 200 --seq_len 2048

The same as ``examples/finetune_trainer.py --full_bf16``: the model is built (or loaded) directly
in BF16, hf_fp8 keeps RoPE, logits and loss in FP32, and the Trainer uses hf_fp8.optim.AdamW
(FP32 moments, stochastically rounded BF16 write-back).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from finetune_trainer import main as finetune  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = ["--output_dir", "runs/full_bf16", "--full_bf16"]
    if "--learning_rate" not in argv:
        defaults += ["--learning_rate", "1e-3"]
    return finetune(defaults + argv)


if __name__ == "__main__":
    main()
