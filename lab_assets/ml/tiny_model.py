"""Build the default experiment's base model: a tiny Llama pre-trained on CPU.

The default experiment must run anywhere without network access or a GPU, so
instead of downloading a base model it manufactures one: a byte-level BPE
tokenizer trained on ``tasks.pretraining_corpus`` and a small
``LlamaForCausalLM`` (GQA attention, SwiGLU MLP, the same module names as real
Llama checkpoints) briefly pre-trained on the same corpus. The result is saved
in plain Hugging Face layout, so every downstream step treats it exactly like a
Hub checkpoint.

The build is deterministic: the same spec on the same machine (same torch
build and thread count) gives byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from lab_assets.ml.tasks import pretraining_corpus

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"


@dataclass
class TinyModelSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_seq_len: int = 64
    pretrain_steps: int = 200
    pretrain_batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0
    corpus_size: int = 4000


@contextlib.contextmanager
def torch_cpu_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops on ``n`` threads inside the block, then restore the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tokenizer(
    corpus: list[str], vocab_size: int, max_seq_len: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``; it prepends ``<s>`` to every encoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # BOS only, no EOS: TRL appends the EOS text itself to completions, and a
    # prompt must tokenize to a prefix of prompt+completion.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_seq_len,
        padding_side="right",
    )


def _pack(corpus: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Concatenate ``<s> line </s>`` for every line and cut into ``seq_len`` blocks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(corpus, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise ValueError(f"corpus too small: {len(stream)} tokens < one block of {seq_len}")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def _lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _pretrain(
    config: LlamaConfig, blocks: torch.Tensor, spec: TinyModelSpec, log: Callable[[str], None]
) -> tuple[LlamaForCausalLM, list[float]]:
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters, {spec.pretrain_steps} pre-training steps")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=0.01, betas=(0.9, 0.95)
    )
    # Epoch-wise shuffles of the packed blocks, from a private RNG.
    order = random.Random(spec.seed)
    queue: list[int] = []
    loss_curve: list[float] = []
    for step in range(spec.pretrain_steps):
        while len(queue) < spec.pretrain_batch_size:
            epoch = list(range(blocks.shape[0]))
            order.shuffle(epoch)
            queue.extend(epoch)
        batch = blocks[queue[: spec.pretrain_batch_size]]
        del queue[: spec.pretrain_batch_size]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec.pretrain_steps, spec.learning_rate)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_curve.append(float(loss.detach()))
        if step % 20 == 0 or step == spec.pretrain_steps - 1:
            log(f"pretrain step {step + 1}/{spec.pretrain_steps} loss {loss_curve[-1]:.4f}")
    model.eval()
    return model, loss_curve


def build_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec,
    log: Callable[[str], None] | None = None,
    *,
    cpu_threads: int | None = 1,
) -> dict:
    """Train tokenizer + tiny Llama per ``spec`` and save both to ``out_dir`` (HF layout).

    Returns ``{"first_loss", "final_loss", "steps", "wall_s", "n_params", "loss_curve"}``.
    Torch runs on ``cpu_threads`` threads during the build (``None``: leave it
    alone); a fixed count also keeps the bytes independent of the core count.
    """
    log = log or (lambda _msg: None)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()

    corpus = pretraining_corpus(spec.corpus_size, spec.seed)
    tokenizer = build_tokenizer(corpus, spec.vocab_size, spec.max_seq_len)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {spec.vocab_size}")
    blocks = _pack(corpus, tokenizer, spec.max_seq_len)
    log(
        f"tokenizer: {len(tokenizer)} tokens; corpus: {len(corpus)} lines, {blocks.shape[0]} blocks"
    )

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )

    with contextlib.ExitStack() as stack:
        if cpu_threads is not None:
            stack.enter_context(torch_cpu_threads(cpu_threads))
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        stack.callback(torch.use_deterministic_algorithms, was_deterministic)
        model, loss_curve = _pretrain(config, blocks, spec, log)
    n_params = sum(p.numel() for p in model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    wall_s = time.perf_counter() - t0
    log(f"saved base model to {out_dir} in {wall_s:.1f}s")
    return {
        "first_loss": loss_curve[0] if loss_curve else float("nan"),
        "final_loss": loss_curve[-1] if loss_curve else float("nan"),
        "steps": len(loss_curve),
        "wall_s": wall_s,
        "n_params": n_params,
        "loss_curve": loss_curve,
    }
