"""The FP8 health monitor in a plain training loop: activation kurtosis, amax, FP8 saturation and underflow.

    python examples/monitor_fp8.py                     # tiny Llama + public-domain text, CPU is fine
    python examples/monitor_fp8.py --plant_outlier     # grow one feature of layer 0's MLP input: see the warning
    python -m hf_fp8.monitor.plot runs/monitor_fp8     # the curves again, from the log

Converts the model, attaches ``hf_fp8.monitor.Fp8Monitor`` (every ``--interval`` steps it measures
each FP8 layer's input on the device and appends one line to ``<output_dir>/fp8_monitor.jsonl``),
trains, prints the aggregates at each sampled step, and writes a PNG of the curves. With the HF
Trainer the same is one flag: ``--fp8_monitor_interval 100``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import hf_fp8
from hf_fp8.monitor import Fp8Monitor, plot

sys.path.insert(0, str(Path(__file__).parent))
from _shared import DEFAULT_TEXT, TextBlocks, load  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", default=None)
    ap.add_argument("--recipe", default=hf_fp8.Fp8Config().recipe.value, choices=["delayed", "tensorwise", "rowwise"])
    ap.add_argument("--text_file", default=str(DEFAULT_TEXT))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=5, help="sample every N steps (the library default is 100)")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kurtosis_threshold", type=float, default=hf_fp8.monitor.DEFAULT_KURTOSIS_THRESHOLD)
    ap.add_argument(
        "--plant_outlier",
        action="store_true",
        help="multiply one feature of layer 0's post-attention norm output by 1.15**step (a growing outlier)",
    )
    ap.add_argument("--output_dir", default="runs/monitor_fp8")
    args = ap.parse_args(argv)

    text = Path(args.text_file).read_text()
    model, tokenizer = load(args.model_name_or_path, text)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    embedded = args.model_name_or_path is None
    # the embedded model is too small for FP8 to pay off: convert all its layers anyway, to show the path
    print(hf_fp8.convert(model, hf_fp8.Fp8Config(recipe=args.recipe, auto_filter=not embedded, exclude=("lm_head",))))
    growth = {"factor": 1.0}
    if args.plant_outlier:

        def grow(module, inputs, out):
            out = out.clone()
            out[..., 0] *= growth["factor"]
            return out

        model.model.layers[0].post_attention_layernorm.register_forward_hook(grow)

    monitor = Fp8Monitor(
        model, interval=args.interval, kurtosis_threshold=args.kurtosis_threshold, log_dir=args.output_dir
    )
    data = torch.utils.data.DataLoader(
        TextBlocks(text, tokenizer, args.seq_len),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"monitoring {len(monitor.layers)} layers every {args.interval} steps")
    print("step    loss   max kurtosis   max underflow   max saturated")
    step = 0
    while step < args.steps:
        for batch in data:
            step += 1
            growth["factor"] = 1.15**step
            batch = {k: v.to(device) for k, v in batch.items()}
            monitor.step_begin(step)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            metrics = monitor.step_end(step)  # None on steps that are not sampled
            if metrics is not None:
                print(
                    f"{step:4d}  {loss.item():6.3f}  {metrics['fp8/max_kurtosis']:13.1f}  "
                    f"{metrics['fp8/max_underflow']:14.2e}  {metrics['fp8/max_saturated']:14.2e}",
                    flush=True,
                )
            if step == args.steps:
                break
    monitor.remove()
    print(f"wrote the monitor log to {monitor.log_file.resolve()}")
    png = plot.plot(monitor.log_file)
    print(f"wrote the curves to {png.resolve()}")
    return png


if __name__ == "__main__":
    main()
