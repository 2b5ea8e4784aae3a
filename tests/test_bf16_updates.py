"""BF16 checkpoints learn: the default optimizer for BF16 parameters keeps every update.

At fine-tuning learning rates an AdamW update is ~lr, a few 1e-4 of a weight: below half a
BF16 ulp (2^-9 relative), so rounding to nearest (torch's AdamW on BF16 parameters) drops most
of them. ``hf_fp8.Trainer`` builds ``hf_fp8.optim.AdamW`` with stochastic rounding instead (BF16
moments with ``--fp8``: torch's memory; FP32 moments with ``--full_bf16``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from llama_fixtures import bigram_batches, tiny_llama, train_losses
from test_trainer import _args

import hf_fp8
from hf_fp8.optim import AdamW

FINETUNE_CHAIN = 3  # the bigram chain fine-tuned on (the base model learned chain 0)


class _Chain(torch.utils.data.Dataset):
    def __init__(self, n=400, seq=32):
        gen = bigram_batches(8, seq, 512, seed=FINETUNE_CHAIN)
        self.ids = torch.cat([next(gen) for _ in range(n // 8)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def pretrained():
    """A tiny Llama trained in FP32 on one bigram chain (its weights grow to where an update at
    lr 2e-5 is ~1e-3 of them), the fine-tuning data (another chain) and a held-out batch of it."""
    model = tiny_llama()
    train_losses(model, torch.optim.AdamW(model.parameters(), lr=3e-3), 100)
    gen = bigram_batches(32, 32, 512, seed=FINETUNE_CHAIN)
    for _ in range(60):  # past the 50 training batches: samples the run never saw
        held = next(gen)
    return model, _Chain(), held


def _finetune(base, data, held, tmp_path, *, bf16: bool, steps: int = 50, **kw):
    model = copy.deepcopy(base).to(torch.bfloat16 if bf16 else torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, max_steps=steps, learning_rate=2e-5, lr_scheduler_type="constant", weight_decay=0.0, **kw)
    trainer = hf_fp8.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    with torch.no_grad():
        loss = copy.deepcopy(model).float()(input_ids=held, labels=held).loss.item()
    return loss, moved / sum(p.numel() for p in model.parameters()), trainer


def test_bf16_checkpoint_learns_like_an_fp32_master_run(pretrained, tmp_path):
    """50 Trainer steps at lr 2e-5 from a BF16 copy of the model, --fp8 and --full_bf16, against
    the same run with FP32 parameters: held-out loss within 0.3% (measured -0.018% and -0.023%)
    with 85% of the weights moved. torch's AdamW (--fp8_adamw false; the default's arithmetic
    before) ends 4.8% off, having moved 16% of them."""
    base, data, held = pretrained
    fp32_loss, _, _ = _finetune(base, data, held, tmp_path / "fp32", bf16=False, fp8="tensorwise")
    results = {}
    for name, kw in {
        "fp8": dict(fp8="tensorwise"),
        "full_bf16": dict(full_bf16=True),
        "nearest": dict(fp8="tensorwise", fp8_adamw=False),
    }.items():
        loss, moved, trainer = _finetune(base, data, held, tmp_path / name, bf16=True, **kw)
        results[name] = ((loss - fp32_loss) / fp32_loss, moved)
        if name == "fp8":  # the default for BF16 parameters: torch's memory, every update kept
            opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            assert isinstance(opt, AdamW) and opt.state_dtype == torch.bfloat16
            assert all(g["stochastic_rounding"] for g in opt.param_groups)
    for name in ("fp8", "full_bf16"):
        gap, moved = results[name]
        assert abs(gap) < 3e-3 and moved > 0.8, (name, results)
    assert results["nearest"][0] > 10 * 3e-3 and results["nearest"][1] < 0.3, results


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_moments_round_stochastically_so_they_decay(backend):
    """With stochastic rounding, BF16 moments are rounded like the weight: exp_avg_sq decaying
    with beta2 = 0.999 and no gradient keeps its mean at 0.999**k of its start (unbiased), where
    round to nearest leaves it at 1.0 forever (0.999 is within half an ulp of 1)."""
    import conftest

    if backend == "triton" and not conftest.INTERPRETER_PATCHED:
        pytest.skip("needs TRITON_INTERPRET=1")
    n = 1 << 16
    results = {}
    for sr in (True, False):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = AdamW([p], lr=0.0, weight_decay=0.0, state_dtype=torch.bfloat16, stochastic_rounding=sr, seed=0)
        p.grad = torch.ones_like(p)
        with hf_fp8.kernel_backend(backend):
            opt.step()  # v = 0.001 * 1
            opt.state[p]["exp_avg_sq"].fill_(1.0)
            opt.state[p]["exp_avg"].fill_(1.0)
            p.grad = torch.zeros_like(p)
            for _ in range(20):
                opt.step()
        results[sr] = (opt.state[p]["exp_avg_sq"].float().mean().item(), opt.state[p]["exp_avg"].float().mean().item())
    v_sr, m_sr = results[True]
    # the mean of 65536 unbiased roundings: standard error ~ ulp/sqrt(n) per step, ~1e-5 over 20
    assert v_sr == pytest.approx(0.999**20, rel=2e-4) and m_sr == pytest.approx(0.9**20, rel=2e-3)
    assert results[False][0] == 1.0  # nearest: frozen


def test_stock_trainer_with_callback_refuses_nearest_rounding_of_bf16_weights(tmp_path):
    """The stock Trainer builds torch's AdamW: with BF16 parameters the callback stops before the
    first step and says how to keep the updates; hf_fp8's AdamW passed in, --fp8_adamw false or
    Fp8Callback(nearest_bf16_updates=True) train."""
    import transformers
    from test_trainer import _Data

    def run(callback=None, optimizer=None, **kw):
        with hf_fp8.set_default_dtype(torch.bfloat16):
            model = tiny_llama()
        opts = (optimizer(model), None) if optimizer else (None, None)
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path, fp8="tensorwise", max_steps=1, **kw), train_dataset=_Data(),
            callbacks=[callback or hf_fp8.Fp8Callback()], optimizers=opts,
        )  # fmt: skip
        trainer.train()
        return trainer

    with pytest.raises(RuntimeError, match=r"AdamW updates the model's BF16 parameters by rounding to nearest"):
        run()
    run(optimizer=lambda m: AdamW(m.parameters(), lr=1e-4, state_dtype=torch.bfloat16))
    run(fp8_adamw=False)
    run(callback=hf_fp8.Fp8Callback(nearest_bf16_updates=True))


def test_accelerator_warns_about_an_optimizer_that_rounds_bf16_weights_to_nearest():
    with hf_fp8.set_default_dtype(torch.bfloat16):
        model = tiny_llama()
    accelerator = hf_fp8.Accelerator(fp8_config=hf_fp8.Fp8Config(auto_filter=False), cpu=True)
    with pytest.warns(UserWarning, match="rounds every update of the BF16 parameters to nearest"):
        accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    import warnings

    with hf_fp8.set_default_dtype(torch.bfloat16):
        model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerator.prepare(model, AdamW(model.parameters(), lr=1e-4, state_dtype=torch.bfloat16))


def test_default_optimizer_runs_where_triton_is_missing():
    """The CPU path of stochastic rounding draws the kernel's bits without importing triton
    (``hf_fp8.kernels`` promises that its references need torch only)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # as if not installed: any import of it fails
        "import torch, hf_fp8\n"
        "p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16)); p.grad = torch.ones_like(p)\n"
        "opt = hf_fp8.optim.AdamW([p], lr=1e-3, state_dtype=torch.bfloat16, seed=0); opt.step()\n"
        "assert abs(p.float().mean().item() - (1 - 1e-3)) < 1e-4, p.float().mean()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
