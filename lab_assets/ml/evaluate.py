"""Held-out evaluation of one adapter against its base model.

Spectra of a weight update only mean something if the update learned what it
was trained for, so every adapter is evaluated on its task's held-out prompts
(``tasks.heldout_examples``: prompts fine-tuning never sees), and so is its base
model on the same prompts (the adapter disabled), in one pass:

* ``task_metric``: greedy exact match of the answer (the first word for
  ``arith``; the generated letters for ``reverse``; the label for ``sentiment``,
  i.e. accuracy). Generation stops at the end-of-sequence token or after a few
  tokens.
* ``nll``: mean negative log-likelihood per token of the correct completion.
* ``pref_accuracy``: how often the model itself gives the correct completion a
  higher log-likelihood than the rejected one.
* ``beats_base``: SFT's task metric, DPO's preference accuracy, above the base's.
* ``reward_accuracy`` / ``reward_margin`` (adapter only): DPO's implicit reward
  ``β·(log π(y|x) − log π_base(y|x))`` of the correct completion minus that of the
  rejected one, with the base as reference: the fraction of pairs where it is
  positive, and its mean. That is TRL's ``rewards/accuracies`` and
  ``rewards/margins`` on held-out pairs (0.5 and 0 for an update that learned
  nothing), computed for SFT adapters too.

The evaluation is deterministic (greedy, no sampling) and small: tens of
prompts, batched by token length so no padding can change a result (a fraction
of a second on one core for the tiny model).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lab_assets.ml.tasks import heldout_examples
from lab_assets.ml.tiny_model import torch_cpu_threads

N_HELDOUT = 64
MAX_NEW_TOKENS = 8


@dataclass
class HeldoutEval:
    """Held-out figures of an adapter and of its base on the same prompts."""

    method: str
    task: str
    n: int
    base_task_metric: float
    task_metric: float
    base_nll: float
    nll: float
    base_pref_accuracy: float
    pref_accuracy: float
    reward_accuracy: float
    reward_margin: float
    dpo_beta: float
    metric_name: str = "exact_match"

    @property
    def beats_base(self) -> bool:
        """Whether the adapter is better than its base at what it was trained for, held out.

        SFT: the task metric (it was trained to produce the answer). DPO: the
        preference accuracy (it was trained to prefer the chosen answer; greedy
        answers can stay wrong when the base never produced the format).
        """
        if self.method == "lora_sft":
            return self.task_metric > self.base_task_metric
        return self.pref_accuracy > self.base_pref_accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"beats_base": self.beats_base}


def _by_length(seqs: list[list[int]]) -> dict[int, list[int]]:
    """Indices of ``seqs`` grouped by length: each group is one batch with no padding."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(seqs):
        groups.setdefault(len(ids), []).append(i)
    return groups


def _completion_logprobs(
    model: Any, tokenizer: Any, prompts: list[str], completions: list[str]
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each completion after its prompt (batched)."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    full_ids = [tokenizer(p + c)["input_ids"] for p, c in zip(prompts, completions, strict=True)]
    for p, ids, text in zip(prompt_ids, full_ids, prompts, strict=True):
        if ids[: len(p)] != p:
            raise ValueError(f"prompt {text!r} is not a token prefix of its completion")
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for idx in _by_length(full_ids).values():
        ids = torch.tensor([full_ids[i] for i in idx], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        token_logp = logp.gather(2, ids[:, 1:, None])[..., 0]
        for row, i in enumerate(idx):
            out[i] = token_logp[row, len(prompt_ids[i]) - 1 :].cpu()
    return out


def _greedy(model: Any, tokenizer: Any, prompts: list[str]) -> list[str]:
    """Greedy continuations (up to ``MAX_NEW_TOKENS``, stopping at EOS), batched."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for idx in _by_length(prompt_ids).values():
        ids = torch.tensor([prompt_ids[i] for i in idx], device=model.device)
        new = torch.empty((len(idx), 0), dtype=torch.long, device=model.device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=model.device)
        for _ in range(MAX_NEW_TOKENS):
            nxt = model(input_ids=torch.cat([ids, new], dim=1)).logits[:, -1].argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def answer_matches(task: str, generated: str, completion: str) -> bool:
    """Whether a generation gives ``completion``'s answer (whitespace-insensitive).

    ``reverse`` compares the letters of the first ``len(answer)`` words; the other
    tasks the first word (so a trailing ``.`` or a second sentence is not held
    against an answer).
    """
    want = completion.split()
    got = generated.split()
    if task == "reverse":
        return got[: len(want)] == want
    return bool(got) and got[0].rstrip(".") == want[0]


def _score(model: Any, tokenizer: Any, task: str, items: list[dict]) -> dict[str, Any]:
    prompts = [ex["prompt"] for ex in items]
    generated = _greedy(model, tokenizer, prompts)
    correct = sum(
        answer_matches(task, g, ex["completion"]) for g, ex in zip(generated, items, strict=True)
    )
    lp_c = _completion_logprobs(model, tokenizer, prompts, [ex["completion"] for ex in items])
    lp_r = _completion_logprobs(model, tokenizer, prompts, [ex["rejected"] for ex in items])
    chosen = [float(t.sum()) for t in lp_c]
    rejected = [float(t.sum()) for t in lp_r]
    n_tokens = sum(t.numel() for t in lp_c)
    n = len(items)
    return {
        "task_metric": correct / n,
        "nll": -math.fsum(chosen) / max(n_tokens, 1),
        "pref_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
        "chosen": chosen,
        "rejected": rejected,
    }


def evaluate_heldout(
    base_model_dir: str | Path,
    adapter_dir: str | Path,
    method: str,
    task: str,
    *,
    dpo_beta: float = 0.1,
    n: int = N_HELDOUT,
    cpu_threads: int | None = 1,
    device: str | None = None,
) -> HeldoutEval:
    """Evaluate the PEFT adapter in ``adapter_dir`` and its base on ``task``'s held-out prompts.

    In float32 on ``device`` (default: CUDA when present, else the CPU with
    ``cpu_threads`` torch threads, ``None`` leaving torch's setting alone).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = heldout_examples(task, n)
    if not items:
        raise ValueError(f"task {task!r} has no held-out prompts")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.ExitStack() as stack:
        if cpu_threads is not None and device == "cpu":
            stack.enter_context(torch_cpu_threads(cpu_threads))
        stack.enter_context(torch.inference_mode())
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).to(device)
        model.eval()
        tuned = _score(model, tokenizer, task, items)
        with model.disable_adapter():
            ref = _score(model, tokenizer, task, items)
    margins = [
        dpo_beta * ((c - rc) - (r - rr))
        for c, r, rc, rr in zip(
            tuned["chosen"], tuned["rejected"], ref["chosen"], ref["rejected"], strict=True
        )
    ]
    return HeldoutEval(
        method=method,
        task=task,
        n=len(items),
        base_task_metric=ref["task_metric"],
        task_metric=tuned["task_metric"],
        base_nll=ref["nll"],
        nll=tuned["nll"],
        base_pref_accuracy=ref["pref_accuracy"],
        pref_accuracy=tuned["pref_accuracy"],
        reward_accuracy=sum(m > 0 for m in margins) / len(margins),
        reward_margin=math.fsum(margins) / len(margins),
        dpo_beta=dpo_beta,
        metric_name="accuracy" if task == "sentiment" else "exact_match",
    )
