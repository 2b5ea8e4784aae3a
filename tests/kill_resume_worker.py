"""One process of tests/test_kill_resume.py: train a tiny Llama with hf_fp8.Trainer for 8 steps
(checkpoint every 4), and either run straight through, die by SIGKILL right after step 5 (as
``kill -9`` would: no handler, no cleanup, the step's work past checkpoint-4 lost), or resume
from checkpoint-4. Writes the final state dict to ``<out>/final.pt``.
Run as ``python tests/kill_resume_worker.py <mode> <phase> <out>``."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(mode: str, phase: str, out: str) -> None:
    torch.set_num_threads(1)
    import transformers
    from llama_fixtures import tiny_llama
    from test_trainer import _args, _Data

    import hf_fp8

    class KillAfter(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGKILL)

    kw = dict(full_bf16=True) if mode == "full_bf16" else dict(fp8="delayed", fp8_auto_filter=False)
    if mode in ("full_bf16", "delayed_bf16"):
        with hf_fp8.set_default_dtype(torch.bfloat16):
            model = tiny_llama()
    else:
        model = tiny_llama()
    args = _args(out, max_steps=8, save_strategy="steps", save_steps=4, **kw)
    callbacks = [KillAfter()] if phase == "killed" else []
    trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(Path(out) / "checkpoint-4") if phase == "resume" else None)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / "final.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
