"""The record of a conversion: per module, converted or kept, and why."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["ModuleDecision", "ConversionReport"]


@dataclasses.dataclass(frozen=True)
class ModuleDecision:
    name: str
    in_features: int
    out_features: int
    converted: bool
    reason: str


_INDEX = re.compile(r"\.(\d+)(?=\.|$)")  # lookahead: consecutive indices (blocks.1.0.w) are all found


def _fold_leaves(names: list[str]) -> str:
    """``a.b.q_proj, a.b.k_proj`` -> ``a.b.{q,k}_proj``: names under one parent, one line."""
    by_parent: dict[str, list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    parts = []
    for parent, leaves in by_parent.items():
        prefix = f"{parent}." if parent else ""
        if len(leaves) == 1:
            parts.append(prefix + leaves[0])
            continue
        tail = ""
        while all(leaf.endswith(leaves[0][-1:]) for leaf in leaves) and min(map(len, leaves)) > 1:
            tail = leaves[0][-1] + tail
            leaves = [leaf[:-1] for leaf in leaves]
        parts.append(prefix + "{" + ",".join(leaves) + "}" + tail)
    return ", ".join(parts)


@dataclasses.dataclass
class ConversionReport:
    """What :func:`hf_fp8.convert` did. ``print(report)`` shows a summary, one line per reason
    (:meth:`summary`); :meth:`table` a table in which layers that differ only by their block
    index (``layers.0`` ... ``layers.31``) share one row."""

    decisions: list[ModuleDecision]
    config_str: str = ""
    rope: str = "not patched"
    loss: str = "not patched"
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.decisions if d.converted]

    @property
    def skipped(self) -> dict[str, str]:
        return {d.name: d.reason for d in self.decisions if not d.converted}

    def __getitem__(self, name: str) -> ModuleDecision:
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(f"no linear layer named {name!r} in this report")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_str,
            "rope": self.rope,
            "loss": self.loss,
            "modules": [dataclasses.asdict(d) for d in self.decisions],
        }

    def _grouped_rows(self) -> list[tuple[str, str, str, str]]:
        groups: dict[tuple, list[str]] = {}
        order: list[tuple] = []
        for d in self.decisions:
            indices = _INDEX.findall(d.name)
            # only names with exactly one block index are grouped (layers.{0-31}.mlp.up_proj)
            pattern = _INDEX.sub(".{i}", d.name) if len(indices) == 1 else d.name
            key = (pattern, d.in_features, d.out_features, d.converted, d.reason)
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(indices[0] if len(indices) == 1 else d.name)
        rows = []
        for key in order:
            members = groups[key]
            pattern, k, n, conv, reason = key
            if len(members) == 1:
                name = pattern.replace("{i}", members[0]) if "{i}" in pattern else pattern
            else:
                idx = sorted(int(m) for m in members)
                contiguous = idx == list(range(idx[0], idx[-1] + 1))
                span = f"{idx[0]}-{idx[-1]}" if contiguous else ",".join(map(str, idx))
                name = pattern.replace("{i}", "{" + span + "}")
            rows.append((name, f"{k}->{n}", "fp8" if conv else "kept", reason))
        return rows

    def table(self) -> str:
        header = ("module", "shape", "status", "reason")
        rows = self._grouped_rows()
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(4)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
        n_conv = len(self.converted)
        out.append(
            f"{n_conv} of {len(self.decisions)} linear layers converted to FP8"
            + (f" ({self.config_str})" if self.config_str else "")
        )
        out.append(f"RoPE: {self.rope}")
        out.append(f"logits and loss: {self.loss}")
        out.extend(self.notes)
        return "\n".join(out)

    def summary(self, width: int = 100) -> str:
        """The report in a few lines: the count, then one line per group of layers kept or converted
        for the same reason (their names with block indices folded), RoPE, loss and notes; no line
        longer than ``width``. :meth:`table` has one row per layer pattern and shape."""
        groups: dict[tuple[bool, str], list[str]] = {}
        counts: dict[tuple[bool, str], int] = {}
        for name, _, status, reason in self._grouped_rows():
            key = (status == "fp8", reason)
            groups.setdefault(key, []).append(name)
        for d in self.decisions:
            key = (d.converted, d.reason)
            counts[key] = counts.get(key, 0) + 1
        out = [
            f"{len(self.converted)} of {len(self.decisions)} linear layers converted to FP8"
            + (f" ({self.config_str})" if self.config_str else "")
        ]
        for (conv, reason), names in sorted(groups.items(), key=lambda kv: not kv[0][0]):
            label = "fp8 " if conv else "kept"
            what = _fold_leaves(list(dict.fromkeys(names)))
            out.append(f"  {label} {counts[(conv, reason)]:>4}  " + (f"{reason}: {what}" if reason else what))
        out.append(f"RoPE: {self.rope}")
        out.append(f"logits and loss: {self.loss}")
        out.extend(self.notes)
        return "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in out)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"ConversionReport(converted={len(self.converted)}, kept={len(self.skipped)}, config={self.config_str!r})"
        )
