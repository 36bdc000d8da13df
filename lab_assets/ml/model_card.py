"""An adapter's model card: ``README.md`` beside its weights, as the Hugging Face Hub reads it.

YAML front matter (``base_model``, ``library_name: peft``, ``tags``), then what a reader
needs to reuse or judge the adapter: how to load it, its hyper-parameters and its
held-out evaluation against its base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_CARD = "README.md"

_HELDOUT = (
    ("metric_name", "task metric"),
    ("base_task_metric", "base, task metric"),
    ("task_metric", "adapter, task metric"),
    ("base_nll", "base, NLL per answer token"),
    ("nll", "adapter, NLL per answer token"),
    ("base_pref_accuracy", "base, prefers chosen"),
    ("pref_accuracy", "adapter, prefers chosen"),
    ("reward_accuracy", "DPO implicit reward accuracy"),
    ("reward_margin", "DPO implicit reward margin"),
    ("beats_base", "beats its base"),
    ("n", "held-out prompts"),
)


def _cell(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v))
    return str(v)


def _yaml_str(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid YAML scalar


def model_card(
    title: str,
    base_model: str,
    hyper: Mapping[str, Any],
    heldout: Mapping[str, Any],
    *,
    base_revision: str | None = None,
    tags: tuple[str, ...] = (),
) -> str:
    """The card's text. ``base_model`` is what ``adapter_config.json`` names: a Hub repo
    id, or a path relative to the adapter directory."""
    local = base_model.startswith(("./", "../"))
    front = ["---", f"base_model: {_yaml_str(base_model)}", "library_name: peft", "tags:"]
    front += [f"- {_yaml_str(t)}" for t in ("lora", "task-geometry-lab", *tags)]
    front.append("---")
    load_base = (
        f'Path(adapter_dir, "{base_model}")'
        if local
        else f'"{base_model}"' + (f', revision="{base_revision}"' if base_revision else "")
    )
    where = (
        f"The base is the lab's own model at `{base_model}` relative to this directory "
        "(`lab fetch --include adapters` fetches it there)."
        if local
        else f"The base is the Hub model `{base_model}`"
        + (f" at revision `{base_revision}`." if base_revision else ".")
    )
    body = [
        f"# {title}",
        "",
        "A LoRA adapter made by the task-geometry lab. " + where,
        "",
        "```python",
        "from pathlib import Path",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        'adapter_dir = "."  # this directory',
        f"base = AutoModelForCausalLM.from_pretrained({load_base})",
        "model = PeftModel.from_pretrained(base, adapter_dir)",
        "```",
        "",
        "## Hyper-parameters",
        "",
        "| name | value |",
        "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in hyper.items()),
        "",
        "## Held-out evaluation",
        "",
        "On the task's held-out prompts (never in the fine-tuning data), against the base.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {label} | {_cell(heldout[k])} |" for k, label in _HELDOUT if k in heldout),
        "",
    ]
    return "\n".join(front + [""] + body)


def write_model_card(out_dir: str | Path, **kwargs: Any) -> Path:
    """Write ``model_card(**kwargs)`` as ``out_dir/README.md``; returns its path."""
    path = Path(out_dir) / MODEL_CARD
    path.write_text(model_card(**kwargs))
    return path
