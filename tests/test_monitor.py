"""The FP8 health monitor (hf_fp8.monitor): its statistics against direct computations, its hooks'
cost model (nothing on steps it does not sample, no host sync, one record per forward under
activation checkpointing), the planted-outlier warning, the plot CLI and the Trainer integration."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from llama_fixtures import bigram_batches, enable_activation_checkpointing, tiny_llama

import hf_fp8
from hf_fp8 import quantize as Q
from hf_fp8.monitor import Fp8Monitor, Fp8MonitorCallback, Fp8MonitorWarning, input_stats
from hf_fp8.monitor.stats import E4M3_FLUSH, E4M3_MAX, STAT_NAMES

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _kurtosis_float64(x: torch.Tensor) -> float:
    """FOG's definition, directly: per token mean(x^4)/mean(x^2)^2 in float64, mean over nonzero tokens."""
    x = x.double().reshape(-1, x.shape[-1])
    m2, m4 = x.square().mean(-1), x.pow(4).mean(-1)
    keep = m2 > 0
    return float((m4[keep] / m2[keep].square()).mean())


def _stats(x, **kw) -> dict[str, float]:
    return dict(zip(STAT_NAMES, input_stats(x, **kw).tolist()))


def _converted_llama(**cfg):
    model = tiny_llama()
    hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False, exclude=("lm_head",), **cfg))
    return model


# ---- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, chunk_elements",
    [
        ((64, 128), torch.float32, 1 << 26),  # one pass
        ((3, 37, 96), torch.float32, 500),  # 3-D input, odd token count, many row chunks
        ((256, 512), torch.bfloat16, 1 << 26),  # the model dtype: upcast inside, no FP32 copy of the input kept
    ],
)
def test_kurtosis_matches_float64(shape, dtype, chunk_elements):
    """input_stats' kurtosis (FP32, rows normalized by their amax, chunked) equals the float64 definition."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x = x.reshape(-1, shape[-1])
    x[:, 5] *= 25.0  # an outlier feature: kurtosis far from 3
    x[1] *= 1e-30  # a tiny row: x^2 underflows FP32 without the normalization
    x[2] *= 1e15  # a huge row: x^4 overflows FP32 without it
    x[3] = 0.0  # an all-zero token has no kurtosis: left out of the mean
    x = x.reshape(shape).to(dtype)
    s = _stats(x, chunk_elements=chunk_elements)
    tokens = math.prod(shape[:-1])
    assert s["tokens"] == tokens - 1
    # FP32 with unit roundoff 6e-8: each token's ratio takes ~10 roundings and the mean ~log2(tokens)
    # more, so 1e-5 is a 100x margin over the worst case while any real error (x^4 vs x^2, the
    # token mean, the zero row) is off by far more.
    ref = _kurtosis_float64(x)
    assert s["kurtosis_sum"] / s["tokens"] == pytest.approx(ref, rel=1e-5)
    assert s["amax"] == x.double().abs().max().item()
    assert float(hf_fp8.monitor.activation_kurtosis(x)) == pytest.approx(ref, rel=1e-5)


def test_non_finite_tokens_are_left_out_of_the_kurtosis():
    """A token holding inf or NaN has no kurtosis; the others' mean is unchanged, and amax shows the NaN."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    finite = x[2:].clone()
    x[0, 3], x[1, 7] = float("inf"), float("nan")
    s = _stats(x)
    assert s["tokens"] == 14
    assert s["kurtosis_sum"] / s["tokens"] == pytest.approx(_kurtosis_float64(finite), rel=1e-5)
    assert math.isnan(s["amax"])


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("hf_fp8.monitor.stats", "hf_fp8.monitor.hooks"):
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, name


def _flush_and_saturation_reference(x2d: torch.Tensor, codes: torch.Tensor, scaled: torch.Tensor):
    """Counts from the real E4M3 codes, plus how many values sit so close to a threshold
    (within 1e-6 relative) that FP32 rounding may put them on either side."""
    underflow = int(((x2d != 0) & (codes.float() == 0)).sum())
    saturated = int((scaled.abs() > E4M3_MAX).sum())
    a = scaled.abs().double()
    ambiguous = int(
        ((a - E4M3_FLUSH).abs() <= 1e-6 * E4M3_FLUSH).sum() + ((a - E4M3_MAX).abs() <= 1e-6 * E4M3_MAX).sum()
    )
    return underflow, saturated, ambiguous


def test_saturation_and_underflow_of_a_delayed_layer_with_known_scale():
    """A delayed-recipe layer whose history forces scale 224: the monitor's saturated and
    flushed-to-zero fractions equal counts over the layer's own E4M3 cast of the input."""
    layer = hf_fp8.Fp8Linear(64, 32, config=hf_fp8.Fp8Config(recipe="delayed"))
    layer(torch.randn(4, 64))  # seeds the history
    with torch.no_grad():
        layer.fp8_amax_history.zero_()
        layer.fp8_amax_history[0, 0] = 2.0  # next input scale = 448 / 2
    g = torch.Generator().manual_seed(1)
    # log-uniform magnitudes from 1e-9 to 10: many values flush (|x| <= 2^-10 / 224 = 4.4e-6), many saturate (|x| > 2)
    x = torch.randn(256, 64, generator=g).sign() * torch.exp(torch.empty(256, 64).uniform_(-20.7, 2.3, generator=g))
    x[::7, ::5] = 0.0  # exact zeros are not "flushed": they were zero before the cast
    mon = Fp8Monitor(layer, interval=1, warn=False)
    with mon.step(1):
        layer(x)
    m = mon.last_metrics
    assert m["fp8/Fp8Linear/scale"] == 224.0 == layer.fp8_scale[0].item()
    scaled = x.float() * 224.0
    codes = Q.quantize_delayed(x, torch.float8_e4m3fn, torch.tensor(224.0), torch.zeros(()), write_t=False).data
    underflow, saturated, ambiguous = _flush_and_saturation_reference(x, codes, scaled)
    assert underflow > 1000 and saturated > 1000, (underflow, saturated)  # the test covers both
    assert abs(m["fp8/Fp8Linear/underflow"] * x.numel() - underflow) <= ambiguous
    assert abs(m["fp8/Fp8Linear/saturated"] * x.numel() - saturated) <= ambiguous
    assert m["fp8/max_saturated"] == m["fp8/Fp8Linear/saturated"]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_dynamic_recipes_underflow_matches_their_cast(recipe):
    """Tensorwise and rowwise scales come from the current amax: nothing saturates, and the
    flushed-to-zero fraction equals the count over the recipe's own E4M3 cast."""
    g = torch.Generator().manual_seed(2)
    # magnitudes spread over e^-28..e^2, per token and within tokens: many flush to zero in either recipe
    x = torch.randn(128, 64, generator=g) * torch.exp(torch.empty(128, 1).uniform_(-12, 2, generator=g))
    x = x * torch.exp(torch.empty(128, 64).uniform_(-16, 0, generator=g))
    x[::7, ::5] = 0.0  # exact zeros are not "flushed": they were zero before the cast
    layer = hf_fp8.Fp8Linear(64, 32, config=hf_fp8.Fp8Config(recipe=recipe))
    mon = Fp8Monitor(layer, interval=1, warn=False)
    with mon.step(1):
        layer(x)
    m = mon.last_metrics
    if recipe == "tensorwise":
        q = Q.quantize_tensorwise(x, torch.float8_e4m3fn)
        scale = Q.amax_to_scale(q.amax, E4M3_MAX)
    else:
        q = Q.quantize_rowwise(x, torch.float8_e4m3fn)
        scale = Q.amax_to_scale(q.amax, E4M3_MAX)[:, None]
    underflow, saturated, ambiguous = _flush_and_saturation_reference(x, q.data, x.float() * scale)
    assert underflow > 100, underflow
    # amax * (448 / amax) may round one FP32 ulp above 448: the cast gives 448 all the same
    assert m["fp8/Fp8Linear/saturated"] == 0.0
    assert int(((x.float() * scale).abs() > E4M3_MAX * (1 + 2**-22)).sum()) == 0
    assert abs(m["fp8/Fp8Linear/underflow"] * x.numel() - underflow) <= ambiguous
    assert m["fp8/Fp8Linear/scale"] == pytest.approx(448.0 / x.abs().max().item(), rel=1e-6)


# ---- hooks: when they run, what they cost --------------------------------------------------


def test_hooks_exist_only_on_sampled_steps(monkeypatch):
    """Non-sampled steps register no hook (the model runs its hook-free path) and compute nothing;
    a sampled step records every forward of every monitored layer (both accumulation micro-batches)."""
    calls = []
    original = hf_fp8.monitor.hooks.input_stats
    monkeypatch.setattr(hf_fp8.monitor.hooks, "input_stats", lambda x, **kw: calls.append(1) or original(x, **kw))
    model = _converted_llama()
    linears = [m for m in model.modules() if isinstance(m, hf_fp8.Fp8Linear)]
    mon = Fp8Monitor(model, interval=3, warn=False)
    assert len(mon.layers) == len(linears) == 14
    ids = next(bigram_batches(2, 16, 512))
    for step in range(1, 7):
        mon.step_begin(step)
        hooked = sum(len(m._forward_hooks) for m in linears)
        for _ in range(2):  # two micro-batches
            model(input_ids=ids, labels=ids).loss.backward()
        metrics = mon.step_end(step)
        if step % 3:
            assert hooked == 0 and metrics is None and not calls, step
        else:
            assert hooked == 14 and len(calls) == 2 * 14, step
            assert metrics["fp8/max_kurtosis"] > 1.0
            calls.clear()
    assert sum(len(m._forward_hooks) for m in linears) == 0


@contextlib.contextmanager
def _forbid_host_sync():
    """Every Tensor method that copies a value to the host raises inside the block."""

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host synchronization in a monitor hook: Tensor.{name}")

        return method

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_hooks_never_sync_with_the_host(monkeypatch, recipe):
    """The hook computes on the device only (no .item(), bool(tensor), ...); the one copy to the
    host happens in step_end. Checked by making those methods raise while a hook runs."""
    original = Fp8Monitor._record

    def guarded(self, *args):
        with _forbid_host_sync():
            original(self, *args)

    monkeypatch.setattr(Fp8Monitor, "_record", guarded)
    model = _converted_llama(recipe=recipe)
    mon = Fp8Monitor(model, interval=1, warn=False)
    ids = next(bigram_batches(2, 16, 512))
    for step in (1, 2):  # the delayed recipe's second step reads its scale from the history
        with mon.step(step):
            model(input_ids=ids, labels=ids).loss.backward()
        assert math.isfinite(mon.last_metrics["fp8/max_kurtosis"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hooks_never_sync_on_gpu():
    """On the GPU, torch's sync debug mode turns any synchronizing call inside the hooks into an error."""
    model = _converted_llama().cuda()
    mon = Fp8Monitor(model, interval=1, warn=False)
    ids = next(bigram_batches(2, 16, 512)).cuda()
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up outside the check
    original = Fp8Monitor._record

    def guarded(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            original(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    Fp8Monitor._record = guarded
    try:
        with mon.step(1):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        Fp8Monitor._record = original
    assert math.isfinite(mon.last_metrics["fp8/max_kurtosis"])


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_records_each_input_once(use_reentrant):
    """Checkpointing recomputes every layer's forward during backward; the monitor skips the
    recomputation, so its metrics equal those of the same step without checkpointing."""
    ref_model = _converted_llama()
    model = copy.deepcopy(ref_model)
    enable_activation_checkpointing(model, use_reentrant)
    model.train()
    ids = next(bigram_batches(2, 16, 512))
    results = []
    for m in (ref_model, model):
        mon = Fp8Monitor(m, interval=1, warn=False)
        mon.step_begin(1)
        m(input_ids=ids, labels=ids).loss.backward()
        counts = {name: len(recs) for name, recs in mon._records.items()}
        results.append((counts, mon.step_end(1)))
    (ref_counts, ref_metrics), (counts, metrics) = results
    assert set(counts.values()) == {1} and counts == ref_counts
    assert metrics.keys() == ref_metrics.keys()
    for k, v in ref_metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-6), k


def test_monitor_does_not_change_training():
    """Hooks only read: the same run with and without the monitor gives bit-identical losses."""

    def losses(monitored: bool) -> list[float]:
        model = _converted_llama()
        mon = Fp8Monitor(model, interval=2, warn=False) if monitored else None
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data, out = bigram_batches(4, 16, 512), []
        for step in range(1, 5):
            ids = next(data)
            with mon.step(step) if mon else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    assert losses(True) == losses(False)


def test_bf16_model_with_linear_modules():
    """On an unconverted model, modules='linear' measures every nn.Linear as the tensorwise recipe
    would cast it; modules='fp8' finds nothing and says what to do."""
    model = tiny_llama()
    with pytest.raises(ValueError, match="no Fp8Linear.*modules='linear'"):
        Fp8Monitor(model)
    mon = Fp8Monitor(model, modules="linear", interval=1, log_per_layer=False)
    assert "lm_head" in mon.layers and len(mon.layers) == 15
    ids = next(bigram_batches(2, 16, 512))
    with mon.step(5):
        model(input_ids=ids)
    assert set(mon.last_metrics) == {"fp8/max_kurtosis", "fp8/max_saturated", "fp8/max_underflow"}
    assert mon.last_metrics["fp8/max_saturated"] == 0.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(interval=0), "interval=0; expected an int >= 1"),
        (dict(modules="attention"), "expected 'fp8'"),
        (dict(kurtosis_threshold=-1.0), "kurtosis_threshold=-1.0"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Fp8Monitor(_converted_llama(), **kw)


def test_step_protocol_errors():
    mon = Fp8Monitor(_converted_llama(), interval=2)
    mon.step_begin(2)
    with pytest.raises(RuntimeError, match="step 2 was begun and never ended"):
        mon.step_begin(3)
    with pytest.raises(ValueError, match="the step begun was 2"):
        mon.step_end(4)


# ---- the warning: a planted growing outlier ------------------------------------------------


def _train(planted_growth: float | None, steps: int):
    """Tiny FP8 Llama on bigram batches, monitored every step. With ``planted_growth``, feature 5
    of layer 0's post-attention RMSNorm output is multiplied by growth**step (an outlier feature
    growing as in a diverging FP8 run), feeding the MLP's gate/up projections. Tensorwise: a
    dynamic recipe never saturates, so the only warnings are the kurtosis detector's (under the
    delayed recipe this high learning rate also saturates early steps, which the monitor reports)."""
    model = _converted_llama(recipe="tensorwise")
    factor = {"value": 1.0}
    if planted_growth is not None:

        def grow(module, args, out):
            out = out.clone()
            out[..., 5] *= factor["value"]
            return out

        model.model.layers[0].post_attention_layernorm.register_forward_hook(grow)
    mon = Fp8Monitor(model, interval=1, kurtosis_threshold=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data, losses = bigram_batches(8, 32, 512, seed=0), []
    with pytest.warns(Fp8MonitorWarning) if planted_growth else contextlib.nullcontext() as caught:
        for step in range(1, steps + 1):
            factor["value"] = planted_growth**step if planted_growth else 1.0
            ids = next(data)
            with mon.step(step):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses, mon.alerts, caught


def test_planted_growing_outlier_warns_before_the_loss_moves():
    """The kurtosis warning fires while the loss still matches a clean twin (same weights, data and
    order) within 1%, and before the loss moves: first differs from the twin's by more than 5%.
    The clean twin (whose largest kurtosis, at the SwiGLU outputs, stays near 15) never warns."""
    steps = 18
    clean, clean_alerts, _ = _train(None, steps)
    planted, alerts, caught = _train(1.3, steps)
    assert clean_alerts == []
    gap = [abs(p - c) / c for p, c in zip(planted, clean)]
    moved = [i + 1 for i, g in enumerate(gap) if g > 0.05]
    assert moved, f"the planted outlier never moved the loss: gaps {gap}"
    first = alerts[0]
    assert first["kind"] == "kurtosis" and first["layer"] in (
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    ), alerts
    warn_step = first["step"]
    assert warn_step < moved[0], f"warned at step {warn_step}, loss moved at step {moved[0]}"
    assert gap[warn_step - 1] < 0.01, f"loss already off by {gap[warn_step - 1]:.1%} at the warning"
    text = str(caught[0].message)
    assert f"step {warn_step}" in text and first["layer"] in text and "rowwise" in text and "learning rate" in text
    # once per layer and kind: gate_proj and up_proj (the same input) warn once each
    assert len([a for a in alerts if a["kind"] == "kurtosis"]) == len({a["layer"] for a in alerts})


# ---- logs on disk and the plot -------------------------------------------------------------


def _write_log(log_dir: Path) -> Path:
    model = _converted_llama(recipe="delayed")
    mon = Fp8Monitor(model, interval=2, log_dir=log_dir, warn=False)
    data = bigram_batches(2, 16, 512)
    for step in range(1, 7):
        ids = next(data)
        with mon.step(step):
            model(input_ids=ids, labels=ids).loss.backward()
    return mon.log_file


def test_jsonl_log_has_one_record_per_sampled_step(tmp_path):
    path = _write_log(tmp_path / "run")
    records = hf_fp8.monitor.read_records(path)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[0]["kurtosis_threshold"] == hf_fp8.monitor.DEFAULT_KURTOSIS_THRESHOLD
    assert "fp8/model.layers.1.mlp.down_proj/underflow" in records[-1]["metrics"]
    # a new monitor on the same directory starts the log afresh; append=True continues it
    Fp8Monitor(_converted_llama(), log_dir=path.parent)
    assert path.read_text() == ""


def test_plot_cli_writes_a_png(tmp_path, capsys):
    from hf_fp8.monitor import plot

    path = _write_log(tmp_path / "run")
    out = plot.main([str(tmp_path), "--out", str(tmp_path / "curves.png")])  # finds the log below tmp_path
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert f"wrote {out.resolve()}" in capsys.readouterr().out
    # as a module, in a fresh process, with the default output beside the log
    proc = subprocess.run(
        [sys.executable, "-m", "hf_fp8.monitor.plot", str(path.parent)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    png = path.parent / "fp8_monitor.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and str(png.resolve()) in proc.stdout


def test_plot_errors_say_what_to_do(tmp_path, monkeypatch, capsys):
    """The CLI on a folder without a log: the reason and the usage line, exit status 2, no traceback."""
    from hf_fp8.monitor import plot

    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no fp8_monitor.jsonl" in err and "usage:" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="no fp8_monitor.jsonl"):
        plot.plot(tmp_path)  # the function raises; only the CLI turns it into a message
    _write_log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match=r"hf_fp8\[monitor\]"):
        plot.main([str(tmp_path)])


# ---- the Trainer -------------------------------------------------------------------------


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16):
        self.ids = next(bigram_batches(n, seq, 512, seed=0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Reporter(transformers.TrainerCallback):
    """Stands in for a report_to integration (TensorBoard, W&B): records what on_log hands it."""

    def __init__(self):
        self.seen: dict[int, set[str]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.setdefault(state.global_step, set()).update(logs)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=3,  # the sampled steps 2 and 4 are not logging steps: the monitor must ask for them
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        fp8="tensorwise",
        fp8_auto_filter=False,
        fp8_exclude=["lm_head"],
    )
    base.update(kw)
    return hf_fp8.TrainingArguments(**base)


def test_hf_fp8_trainer_logs_monitor_metrics_to_reporters(tmp_path):
    """--fp8_monitor_interval 2 with hf_fp8.Trainer: the metrics of steps 2 and 4 reach the log
    history and a stand-in reporter registered where the Trainer puts report_to integrations
    (right after DefaultFlowCallback, before user callbacks) as well as a user callback."""
    reporter, late = _Reporter(), _Reporter()
    trainer = hf_fp8.Trainer(
        model=tiny_llama(), args=_args(tmp_path, fp8_monitor_interval=2), train_dataset=_Data(), callbacks=[late]
    )
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(
        callbacks.index(next(c for c in callbacks if type(c).__name__ == "DefaultFlowCallback")) + 1, reporter
    )
    assert isinstance(callbacks[0], Fp8MonitorCallback) and trainer.fp8_monitor is callbacks[0]
    trainer.train()
    key = "fp8/model.layers.0.mlp.down_proj/kurtosis"
    for who in (reporter, late):
        for step in (2, 4):
            assert {"fp8/max_kurtosis", key, "loss"} <= who.seen.get(step, set()), (step, who.seen.get(step))
        assert not any(k.startswith("fp8/") for k in who.seen.get(3, set()))
    history = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert key in history[2] and key in history[4] and key not in history[3]
    records = hf_fp8.monitor.read_records(tmp_path / "fp8_monitor.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert records[1]["metrics"][key] == history[4][key]


def test_stock_trainer_with_fp8_callback_flag(tmp_path):
    """The stock Trainer with Fp8Callback honours --fp8_monitor_interval too (log history and JSONL)."""
    trainer = transformers.Trainer(
        model=tiny_llama(),
        args=_args(tmp_path, fp8_monitor_interval=2, max_steps=2),
        train_dataset=_Data(),
        callbacks=[hf_fp8.Fp8Callback()],
    )
    trainer.train()
    assert "fp8/max_kurtosis" in trainer.state.log_history[0] and trainer.state.log_history[0]["step"] == 2
    assert (tmp_path / "fp8_monitor.jsonl").is_file()


def test_trainer_monitor_on_a_run_without_fp8(tmp_path):
    """Without --fp8 there is no Fp8Linear: the monitor watches every nn.Linear (a BF16 baseline's health)."""
    trainer = hf_fp8.Trainer(
        model=tiny_llama(), args=_args(tmp_path, fp8=None, fp8_monitor_interval=2, max_steps=2), train_dataset=_Data()
    )
    trainer.train()
    assert len(trainer.fp8_monitor.monitor.layers) == 15
    assert "fp8/lm_head/kurtosis" in trainer.state.log_history[0]


def test_callback_warns_when_it_runs_after_reporters(tmp_path):
    """A callback placed after the report_to integrations says they will miss the metrics; attach() fixes it."""
    model = _converted_llama()
    args = types.SimpleNamespace(report_to=["tensorboard"], output_dir=str(tmp_path))
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb = Fp8MonitorCallback(interval=2)
    with pytest.warns(UserWarning, match=r"attach\(trainer\)"):
        cb.on_train_begin(args, state, control, model=model)
    cb.first = True  # what attach(trainer) sets
    with warnings_as_errors():
        cb.on_train_begin(args, state, control, model=model)


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_monitor_interval_argument(tmp_path):
    parser = transformers.HfArgumentParser(hf_fp8.TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fp8", "rowwise", "--fp8_monitor_interval", "100", "--report_to", "none"]
    )
    assert args.fp8_monitor_interval == 100 and json.loads(args.to_json_string())["fp8_monitor_interval"] == 100
    with pytest.raises(ValueError, match="--fp8_monitor_interval: got -1; expected an int >= 0"):
        _args(tmp_path, fp8_monitor_interval=-1)


def test_a_sampled_step_without_forward_warns_once():
    """Nothing recorded on a sampled step (a compiled model does not call hooks added after
    compilation) is reported, once, instead of silently logging nothing."""
    mon = Fp8Monitor(_converted_llama(), interval=1)
    with pytest.warns(Fp8MonitorWarning, match="no monitored layer ran a forward.*torch.compile"):
        with mon.step(1):
            pass
    assert mon.last_metrics is None
    with warnings_as_errors():
        with mon.step(2):
            pass
