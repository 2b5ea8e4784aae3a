"""Two versions of hf_fp8 on the same GPU, interleaved: a change measured against the code before it.

    python -m benchmarks.bench_llama_ab --base /tmp/base --base-sha <sha> [--configs 8b 1b]
        [--variants hf_fp8_delayed] [--peers stock_bf16 torchao_tensorwise_compile] [--pairs 3]

Step times of one code version differ by 1-2 ms between processes and machines (clocks under the
power cap, host speed), as much as a host-side change is worth. So each of ``--variants`` runs
``--pairs`` times from this tree and from ``--base`` (a source tree laid out as installed, e.g.
the same ``run_gpu.sh`` layout of an older commit), alternating, each run its own
``benchmarks.bench_llama`` process; the peers run once per pair from this tree (stock BF16 only in
the first), so every ratio has a neighbour measured minutes apart. The rows carry ``tree``
(``current`` or ``base``) and ``pair``; the JSON (``--out``) gives both git SHAs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import environment, write_json

HERE = Path(__file__).resolve().parent.parent  # the tree this module runs from


def tree_env(tree: Path) -> dict:
    """This process's environment with ``tree`` first on the path (and this tree off it)."""
    env = dict(os.environ)
    site = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != HERE]
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *site])
    return env


def imported_from(tree: Path) -> str:
    """Where ``import hf_fp8`` resolves in ``tree``'s processes (the record that each side ran its own code)."""
    code = "import hf_fp8, hf_fp8.kernels.quant as q; print(hf_fp8.__file__, q.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip()[-300:]


def run_one(tree: Path, config: str, variant: str, args) -> dict:
    """One variant of one config in a fresh process of ``tree``'s bench_llama: its row, or the error."""
    tmp = f".ab_{config}_{variant}.json"
    env = tree_env(tree)
    with tempfile.TemporaryDirectory() as out:
        env["OUT"] = out  # bench_llama copies its JSON there too: keep it out of this run's $OUT
        cmd = [sys.executable, "-m", "benchmarks.bench_llama", "--configs", config, "--variants", variant]
        cmd += ["--out", tmp, "--warmup", str(args.warmup), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    path = tree / "benchmarks" / "results" / tmp
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    path.unlink(missing_ok=True)
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(variant=variant, error=f"exit status {proc.returncode}: {' | '.join(tail)[:300]}")
    keep = ("variant", "note", "step_ms", "tokens_per_s", "peak_mem_gb", "loss", "error")
    return {k: v for k, v in rows[0].items() if k in keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="source tree of the code to compare against")
    ap.add_argument("--base-sha", default="unknown", help="git SHA of --base, for the record")
    ap.add_argument("--configs", nargs="+", default=["8b"])
    ap.add_argument("--variants", nargs="+", default=["hf_fp8_delayed"])
    ap.add_argument("--peers", nargs="*", default=["stock_bf16", "torchao_tensorwise_compile"])
    ap.add_argument("--peer-pairs", type=int, default=2, help="pairs that also run the peers (stock: the first)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="llama_ab_h100.json")
    args = ap.parse_args()
    if not (args.base / "benchmarks" / "bench_llama.py").exists():
        ap.error(f"--base {args.base}: no benchmarks/bench_llama.py there (lay the tree out as run_gpu.sh does)")

    imports = {"current": imported_from(HERE), "base": imported_from(args.base)}
    print(json.dumps(imports), flush=True)
    rows = []
    for config in args.configs:
        for pair in range(args.pairs):
            runs = []
            for variant in args.variants:
                first, second = (HERE, args.base) if pair % 2 == 0 else (args.base, HERE)  # alternate the order
                runs += [(first, variant), (second, variant)]
            if pair < args.peer_pairs:
                runs += [(HERE, p) for p in args.peers if p != "stock_bf16" or pair == 0]
            for tree, variant in runs:
                row = run_one(tree, config, variant, args)
                row.update(config=config, pair=pair, tree="current" if tree == HERE else "base")
                rows.append(row)
                print(json.dumps(row), flush=True)
                env = environment()
                meta = {
                    "base_git_sha": args.base_sha,
                    "imports": imports,
                    "args": vars(args) | {"base": str(args.base)},
                }
                write_json(args.out, {"env": env, **meta, "rows": rows})


if __name__ == "__main__":
    main()
