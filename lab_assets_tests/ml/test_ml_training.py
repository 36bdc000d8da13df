"""Real training on a real (tiny) model: task data, base-model build, LoRA-SFT and DPO.

Nothing is mocked: a small Llama is built and pre-trained once per module, and
adapters are trained on it with TRL exactly as the ``adapter`` asset does.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lab_assets.ml.tasks import (
    TASK_GENERATOR_VERSION,
    TASKS,
    heldout_examples,
    preference_pairs,
    pretraining_corpus,
    sft_examples,
    split_of,
)
from lab_assets.ml.tiny_model import TinyModelSpec, build_tiny_model
from lab_assets.ml.train import TrainResult, TrainSpec, train_adapter

# PEFT 0.21 still calls transformers' v5-deprecated `is_gradient_checkpointing` when
# loading an adapter; train_adapter silences it itself.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

SMALL_SPEC = TinyModelSpec(pretrain_steps=20, corpus_size=500)
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}


# --------------------------------------------------------------------------- tasks


def test_task_generators_are_deterministic_and_seed_dependent():
    assert isinstance(TASK_GENERATOR_VERSION, str)
    for task in TASKS:
        assert sft_examples(task, 40, 1) == sft_examples(task, 40, 1)
        assert preference_pairs(task, 40, 1) == preference_pairs(task, 40, 1)
        assert sft_examples(task, 40, 1) != sft_examples(task, 40, 2)
        assert len(sft_examples(task, 7, 0)) == 7
    assert pretraining_corpus(100, 3) == pretraining_corpus(100, 3)
    assert pretraining_corpus(100, 3) != pretraining_corpus(100, 4)


def _arith_answer(prompt: str) -> int:
    a, b = prompt.removeprefix("Q: ").removesuffix("=").split("+")
    return int(a) + int(b)


def _reverse_word(prompt: str) -> str:
    return prompt.removeprefix("Reverse: ").removesuffix(" ->").replace(" ", "")


def _spaced(word: str) -> str:
    return " " + " ".join(word)


def test_sft_completions_are_correct():
    for ex in sft_examples("arith", 200, 0):
        assert ex["prompt"].startswith("Q: ") and ex["prompt"].endswith("=")
        assert ex["completion"] == f" {_arith_answer(ex['prompt'])}"
    for ex in sft_examples("reverse", 200, 0):
        word = _reverse_word(ex["prompt"])
        assert word.isalpha() and word != word[::-1] and len(word) == 3
        assert ex["completion"] == _spaced(word[::-1])
    labels = [ex["completion"] for ex in sft_examples("sentiment", 200, 0)]
    assert set(labels) == {" positive", " negative"}
    for ex in sft_examples("sentiment", 200, 0):
        assert ex["prompt"].startswith("Review: ") and ex["prompt"].endswith(" Sentiment:")


def test_preference_pairs_prefer_the_correct_answer():
    for ex in preference_pairs("arith", 200, 0):
        assert ex["chosen"] == f" {_arith_answer(ex['prompt'])}"
        assert ex["rejected"] != ex["chosen"] and int(ex["rejected"]) >= 0
    kinds = set()
    for ex in preference_pairs("reverse", 200, 0):
        word = _reverse_word(ex["prompt"])
        assert ex["chosen"] == _spaced(word[::-1])
        assert ex["rejected"] != ex["chosen"]
        assert sorted(ex["rejected"].split()) == sorted(word)  # same letters, wrong order
        kinds.add("unreversed" if ex["rejected"] == _spaced(word) else "partial")
    assert kinds == {"unreversed", "partial"}
    flips = {(ex["chosen"], ex["rejected"]) for ex in preference_pairs("sentiment", 200, 0)}
    assert flips == {(" positive", " negative"), (" negative", " positive")}


def test_training_never_sees_a_heldout_prompt():
    for task in TASKS:
        heldout = heldout_examples(task, 64)
        prompts = {ex["prompt"] for ex in heldout}
        assert len(prompts) == len(heldout) > 0
        assert all(split_of(p) == "heldout" for p in prompts)
        assert heldout == heldout_examples(task, 64)  # the same for every adapter
        for seed in range(3):
            train = {ex["prompt"] for ex in sft_examples(task, 300, seed)}
            train |= {ex["prompt"] for ex in preference_pairs(task, 300, seed)}
            train |= {ex["prompt"] for ex in preference_pairs(task, 300, seed, shuffled=True)}
            assert not train & prompts, task
        assert all(
            split_of(ex["prompt"]) == "heldout" for ex in sft_examples(task, 50, 0, split="heldout")
        )
    assert len(heldout_examples("sentiment", 64)) == 64
    assert 10 <= len(heldout_examples("arith", 64)) <= 30  # 100 prompts, ~1 in 5 held out
    with pytest.raises(ValueError, match="unknown split"):
        sft_examples("arith", 3, 0, split="test")


def test_shuffled_preferences_swap_about_half_and_keep_prompts():
    real = preference_pairs("sentiment", 400, 3)
    shuffled = preference_pairs("sentiment", 400, 3, shuffled=True)
    assert [e["prompt"] for e in real] == [e["prompt"] for e in shuffled]
    swapped = [
        (s["chosen"], s["rejected"]) == (r["rejected"], r["chosen"])
        for r, s in zip(real, shuffled, strict=True)
    ]
    kept = [s == r for r, s in zip(real, shuffled, strict=True)]
    assert all(a or b for a, b in zip(swapped, kept, strict=True))
    assert 0.4 < sum(swapped) / len(swapped) < 0.6


def test_pretraining_corpus_mixes_every_task_and_filler():
    corpus = pretraining_corpus(400, 0)
    assert len(corpus) == 400
    assert any(" plus " in line for line in corpus)
    assert any(" backwards are " in line for line in corpus)
    assert any(line.endswith(" review.") for line in corpus)
    filler = [
        line for line in corpus if not any(k in line for k in ("plus", "backwards", "review"))
    ]
    assert len(filler) >= 50


@pytest.mark.parametrize("fn", [sft_examples, preference_pairs])
def test_unknown_task_is_a_clear_error(fn):
    with pytest.raises(ValueError, match=r"'poetry'.*arith, reverse, sentiment"):
        fn("poetry", 3, 0)


# --------------------------------------------------------------------------- base model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny"
    metrics = build_tiny_model(out, SMALL_SPEC)
    assert metrics["steps"] == SMALL_SPEC.pretrain_steps
    assert len(metrics["loss_curve"]) == SMALL_SPEC.pretrain_steps
    assert metrics["final_loss"] < metrics["first_loss"]
    return out


def _load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def test_tiny_model_loads_back_in_hf_layout(base_dir):
    from transformers import AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in base_dir.iterdir()
    }
    model = _load_base(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 128)  # GQA
    assert len(tok) <= cfg.vocab_size
    assert tok.pad_token_id != tok.eos_token_id
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)

    # TRL finds the completion where prompt and prompt+completion tokenizations diverge.
    for task in TASKS:
        for ex in sft_examples(task, 30, 0):
            prompt = tok(ex["prompt"])["input_ids"]
            full = tok(ex["prompt"] + ex["completion"] + tok.eos_token)["input_ids"]
            assert prompt[0] == tok.bos_token_id
            assert full[: len(prompt)] == prompt and full[-1] == tok.eos_token_id

    ids = tok("Q: 3+4=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_model_build_is_bitwise_deterministic(base_dir, tmp_path):
    metrics = build_tiny_model(tmp_path / "again", SMALL_SPEC)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (base_dir / name).read_bytes(), name
    assert metrics["n_params"] == sum(p.numel() for p in _load_base(base_dir).parameters())


# --------------------------------------------------------------------------- adapters


def _train(base_dir: Path, out: Path, **kw) -> TrainResult:
    kw.setdefault("method", "lora_sft")
    kw.setdefault("task", "arith")
    kw.setdefault("seed", 0)
    return train_adapter(base_dir, out, TrainSpec(**kw))


@pytest.fixture(scope="module")
def sft_run(base_dir, tmp_path_factory) -> tuple[Path, TrainResult]:
    out = tmp_path_factory.mktemp("sft") / "adapter"
    return out, _train(base_dir, out)


@pytest.fixture(scope="module")
def dpo_run(base_dir, tmp_path_factory) -> tuple[Path, TrainResult]:
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    return out, _train(base_dir, out, method="dpo", task="sentiment", steps=20)


def _expected_lora_params(base_dir: Path, rank: int) -> int:
    model = _load_base(base_dir)
    targets = TrainSpec(method="lora_sft", task="arith", seed=0).target_modules
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def _logits_with_adapter(base_dir: Path, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(["Q: 12+7=", "Reverse: abcd ->"], padding=True, return_tensors="pt")
    base = _load_base(base_dir)
    with torch.no_grad():
        before = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
        after = tuned(**ids).logits
    return before, after


def test_sft_adapter_is_peft_layout_and_learns(base_dir, sft_run):
    out, result = sft_run
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # scratch dir cleaned up
    assert (result.device, result.precision) == ("cpu", "fp32")
    assert result.steps == 30 and len(result.loss_curve) == 30
    assert result.trainable_params == _expected_lora_params(base_dir, rank=8)
    assert result.final_loss < result.first_loss
    assert sum(result.loss_curve[-5:]) < 0.8 * sum(result.loss_curve[:5])

    before, after = _logits_with_adapter(base_dir, out)
    assert not torch.allclose(before, after, atol=1e-4)


def test_dpo_adapter_is_peft_layout_and_changes_the_model(base_dir, dpo_run):
    out, result = dpo_run
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES
    assert result.steps == 20 and len(result.loss_curve) == 20
    assert all(math.isfinite(x) for x in result.loss_curve)
    # The reference is the base (adapters disabled) and LoRA's B starts at zero,
    # so the first DPO loss is exactly -log(sigmoid(0)) = ln 2.
    assert result.first_loss == pytest.approx(math.log(2), abs=1e-3)

    before, after = _logits_with_adapter(base_dir, out)
    assert not torch.allclose(before, after, atol=1e-4)


def test_same_seed_gives_identical_adapter_other_seed_does_not(base_dir, sft_run, tmp_path):
    out, _ = sft_run
    threads = torch.get_num_threads()
    _train(base_dir, tmp_path / "same")
    assert torch.get_num_threads() == threads  # restored after the run
    _train(base_dir, tmp_path / "other", seed=1)
    ref = load_file(out / "adapter_model.safetensors")
    same = load_file(tmp_path / "same" / "adapter_model.safetensors")
    other = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert ref.keys() == same.keys() == other.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref)


def test_dpo_rerun_is_bitwise_identical(base_dir, tmp_path):
    a = _train(base_dir, tmp_path / "a", method="dpo", task="reverse", steps=5)
    b = _train(base_dir, tmp_path / "b", method="dpo", task="reverse", steps=5)
    assert a.loss_curve == b.loss_curve
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()


def test_unknown_method_or_task_fails_before_training(base_dir, tmp_path):
    with pytest.raises(ValueError, match="'poetry'"):
        _train(base_dir, tmp_path / "x", task="poetry")
    with pytest.raises(ValueError, match="'ppo'.*lora_sft, dpo"):
        _train(base_dir, tmp_path / "x", method="ppo")


class _Preempted(Exception):
    pass


def test_checkpoint_resume_after_a_crash_and_with_more_steps(base_dir, tmp_path):
    spec = TrainSpec(method="lora_sft", task="reverse", seed=2, steps=6)
    uninterrupted = train_adapter(base_dir, tmp_path / "straight", spec)

    def crash_at_step_5(msg: str) -> None:
        if "step 5/" in msg:
            raise _Preempted(msg)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Preempted):
        train_adapter(
            base_dir, tmp_path / "resumed", spec, crash_at_step_5, ckpt, checkpoint_every=2
        )
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in ckpt.iterdir()}
    assert not (tmp_path / "resumed").exists()

    lines: list[str] = []
    resumed = train_adapter(
        base_dir, tmp_path / "resumed", spec, lines.append, ckpt, checkpoint_every=2
    )
    assert any("resuming from" in m and m.endswith("checkpoint-4") for m in lines)
    assert sum("loss" in m and " step " in m for m in lines) == 2  # only steps 5 and 6 ran
    assert resumed.steps == 6
    assert resumed.loss_curve == uninterrupted.loss_curve
    # Optimizer, scheduler, RNG and data order all resume exactly.
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "straight" / "adapter_model.safetensors"
    ).read_bytes()

    # Crash after the last checkpoint but before the export: the finished
    # checkpoint is exported as is, without the extra step a Trainer resume runs.
    again = train_adapter(base_dir, tmp_path / "again", spec, None, ckpt, checkpoint_every=2)
    assert again.steps == 6 and again.loss_curve == uninterrupted.loss_curve
    assert again.trainable_params == uninterrupted.trainable_params
    for name in ADAPTER_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (
            tmp_path / "straight" / name
        ).read_bytes(), name

    other_task = TrainSpec(method="lora_sft", task="arith", seed=2, steps=6)
    with pytest.raises(ValueError, match="another run"):
        train_adapter(base_dir, tmp_path / "x", other_task, None, ckpt)

    lines.clear()
    longer = TrainSpec(method="lora_sft", task="reverse", seed=2, steps=8)
    extended = train_adapter(
        base_dir, tmp_path / "extended", longer, lines.append, ckpt, checkpoint_every=2
    )
    assert any(m.endswith("checkpoint-6") for m in lines if "resuming from" in m)
    assert extended.steps == 8
    assert extended.loss_curve[:6] == uninterrupted.loss_curve
    assert len(extended.loss_curve) == 8


def test_log_every_s_keeps_the_first_and_last_loss_lines(base_dir, tmp_path):
    lines: list[str] = []
    spec = TrainSpec(method="lora_sft", task="arith", seed=0, steps=5)
    train_adapter(base_dir, tmp_path / "a", spec, lines.append, log_every_s=3600)
    steps = [m.split()[2] for m in lines if " step " in m and "loss" in m]
    assert steps == ["1/5", "5/5"]


# --------------------------------------------------------------------------- held-out evaluation


def test_answer_matching():
    from lab_assets.ml.evaluate import answer_matches

    assert answer_matches("arith", " 12", " 12") and answer_matches("arith", "12. 3", " 12")
    assert not answer_matches("arith", " 1 2", " 12") and not answer_matches("arith", "", " 1")
    assert answer_matches("reverse", " c b a and more", " c b a")
    assert not answer_matches("reverse", " c b", " c b a")
    assert answer_matches("sentiment", " positive review", " positive")


def test_an_untrained_adapter_evaluates_exactly_as_its_base(base_dir, tmp_path):
    """LoRA's B starts at zero: the adapter is the base, so every paired figure is equal."""
    from peft import LoraConfig, get_peft_model

    from lab_assets.ml.evaluate import evaluate_heldout

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(_load_base(base_dir), config).save_pretrained(tmp_path / "zero")
    ev = evaluate_heldout(base_dir, tmp_path / "zero", "dpo", "arith", n=8)
    assert ev.n == 8
    assert ev.task_metric == ev.base_task_metric
    assert ev.nll == pytest.approx(ev.base_nll, abs=1e-9)
    assert ev.pref_accuracy == ev.base_pref_accuracy
    assert ev.reward_margin == 0 and ev.reward_accuracy == 0
    assert not ev.beats_base
    assert ev.to_dict()["beats_base"] is False


def test_heldout_evaluation_of_a_trained_sft_adapter(base_dir, sft_run):
    from lab_assets.ml.evaluate import evaluate_heldout

    out, _ = sft_run
    ev = evaluate_heldout(base_dir, out, "lora_sft", "arith", n=12)
    d = ev.to_dict()
    assert d["n"] == 12 and d["metric_name"] == "exact_match"
    for k in ("task_metric", "base_task_metric", "pref_accuracy", "reward_accuracy"):
        assert 0 <= d[k] <= 1, k
    # 30 steps of SFT on the training prompts lower the NLL of held-out answers
    assert ev.nll < ev.base_nll
    assert ev.beats_base == (ev.task_metric > ev.base_task_metric)
