"""Spectral extraction checked against dense linear algebra and against PEFT itself.

No mocks: tiny Llama and GPT-2 models are built from configs with random
weights, wrapped by PEFT, given random non-zero LoRA factors (PEFT starts B at
zero), saved in PEFT layout and merged by PEFT; our singular values must match a
dense SVD of PEFT's own merged update.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lab_assets.cli.main import main
from lab_assets.ml.adapter_io import (
    LoraModule,
    UnsupportedAdapterError,
    get_pattern_key,
    iter_lora_modules,
    read_adapter_config,
)
from lab_assets.ml.spectral import (
    BaseModuleSpectrum,
    adapter_spectrum,
    compute_base_spectrum,
    effective_rank,
    load_base_spectrum,
    load_base_weight,
    lora_svd,
    module_features,
    save_base_spectrum,
    top_k_svd,
    write_spectrum_parquet,
)

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = [*LLAMA_ATTN, "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------- model helpers


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=128, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return GPT2LMHeadModel(cfg)


def _make_adapter(model_fn, lora_config, out_dir, dtype=torch.float32, seed=1):
    """Save a PEFT adapter with random factors; return {module: dense ΔW (out × in)} and scales.

    The reference ΔW is PEFT's own: merge_and_unload (in float32) minus the base
    weight, transposed to out × in for Conv1D. For fp16/bf16 the model is cast,
    saved, then upcast exactly to float32 before merging, so the reference is the
    update the saved (rounded) factors describe.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(model_fn(), lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(str(out_dir))
    peft_model = peft_model.to(torch.float32)

    scales, conv1d = {}, {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            scales[name] = float(module.scaling["default"])
            conv1d[name] = bool(module.fan_in_fan_out)
    base = {
        n: module.base_layer.weight.detach().clone().double()
        for n, module in peft_model.base_model.model.named_modules()
        if n in scales
    }
    merged = peft_model.merge_and_unload()
    state = merged.state_dict()
    deltas = {}
    for name in scales:
        d = (state[f"{name}.weight"].double() - base[name]).numpy()
        deltas[name] = d.T if conv1d[name] else d
    return deltas, scales


def _assert_svs_match(df: pd.DataFrame, deltas: dict[str, np.ndarray], rel: float) -> None:
    assert sorted(df["module"]) == sorted(deltas)
    for _, row in df.iterrows():
        ours = np.asarray(row["singular_values"])
        assert np.all(np.diff(ours) <= 0), "singular values must be descending"
        ref = np.linalg.svd(deltas[row["module"]], compute_uv=False)[: len(ours)]
        assert len(ours) == row["rank"]
        err = np.abs(ours - ref).max() / ref[0]
        assert err < rel, (row["module"], err)


@pytest.fixture(scope="module")
def llama_base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_base")
    _llama().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama_sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_sharded")
    _llama().save_pretrained(str(path), max_shard_size="60KB")
    return path


@pytest.fixture(scope="module")
def llama_patterns_adapter(tmp_path_factory):
    from peft import LoraConfig

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_ALL,
        use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 32, "model.layers.0.mlp.up_proj": 3},
    )
    path = tmp_path_factory.mktemp("llama_patterns")
    deltas, scales = _make_adapter(_llama, cfg, path)
    return path, deltas, scales


# ------------------------------------------------------------- pure linear algebra


@pytest.mark.parametrize("shape", [(50, 30, 6), (20, 70, 5), (40, 40, 12), (6, 9, 8)])
def test_lora_svd_matches_dense_svd(shape):
    out, inp, r = shape
    rng = np.random.default_rng(sum(shape))
    A, B = rng.standard_normal((r, inp)), rng.standard_normal((out, r))
    scale = 0.37
    U, S, Vh = lora_svd(A, B, scale)
    dense = scale * B @ A
    ref = np.linalg.svd(dense, compute_uv=False)
    m = min(r, out, inp)
    assert S.shape == (m,)
    assert np.all(np.diff(S) <= 0)
    assert np.abs(S - ref[:m]).max() / ref[0] < 1e-8
    assert np.abs((U * S) @ Vh - dense).max() / np.abs(dense).max() < 1e-8
    assert np.allclose(U.T @ U, np.eye(m), atol=1e-10)
    assert np.allclose(Vh @ Vh.T, np.eye(m), atol=1e-10)


def test_lora_svd_of_zero_update_and_effective_rank():
    U, S, Vh = lora_svd(np.ones((3, 8)), np.zeros((5, 3)), 2.0)
    assert np.all(S == 0)
    assert math.isnan(effective_rank(S))
    assert effective_rank(np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(np.array([5.0, 0.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(60, 40), (300, 270)])  # dense path, then ARPACK path
def test_top_k_svd_with_low_rank_update_matches_dense(shape):
    rng = np.random.default_rng(3)
    W = rng.standard_normal(shape)
    A, B = rng.standard_normal((4, shape[1])), rng.standard_normal((shape[0], 4))
    u, s, vh = top_k_svd(W, 6, (A, B, 0.5), device="cpu")
    U, S, Vh = np.linalg.svd(W + 0.5 * B @ A)
    assert np.abs(s - S[:6]).max() / S[0] < 1e-10
    assert np.allclose(np.abs(np.sum(u * U[:, :6], axis=0)), 1, atol=1e-8)
    assert np.allclose(np.abs(np.sum(vh * Vh[:6], axis=1)), 1, atol=1e-8)


@pytest.mark.parametrize("shape", [(48, 36), (290, 260)])
def test_base_relative_features_match_dense_reference(shape):
    out, inp = shape
    rng = np.random.default_rng(7)
    # A base with a decaying spectrum, so its top vectors are well defined
    W = rng.standard_normal((out, 5)) @ np.diag([40.0, 30, 20, 10, 5]) @ rng.standard_normal(
        (5, inp)
    ) / np.sqrt(inp) + 0.1 * rng.standard_normal(shape)
    r, k, scale = 3, 5, 2.0
    A, B = rng.standard_normal((r, inp)), rng.standard_normal((out, r))
    mod = LoraModule("m.layers.0.q_proj", A, B, scale, r, 8.0, False)
    dW = scale * B @ A
    Ub, Sb, Vhb = np.linalg.svd(W, full_matrices=False)
    Ud, Sd, Vhd = np.linalg.svd(dW)
    Uf, Sf, Vhf = np.linalg.svd(W + dW)
    full = BaseModuleSpectrum(Ub, Sb, Vhb)  # every base singular triplet
    ki = 4
    feats = module_features(mod, full, W, k=k, intruder_k=ki)

    q = min(r, k)
    assert feats["subspace_overlap"] == pytest.approx(
        np.sum((Ub[:, :k].T @ Ud[:, :q]) ** 2) / q, rel=1e-8
    )
    assert feats["subspace_overlap_right"] == pytest.approx(
        np.sum((Vhb[:k] @ Vhd[:q].T) ** 2) / q, rel=1e-8
    )
    # Shuttleworth et al.: the top intruder_k vectors of W + ΔW against ALL base vectors
    max_cos = np.abs(Ub.T @ Uf[:, :ki]).max(axis=0)
    assert feats["intruder_dims"] == int(np.sum(max_cos < 0.5))
    max_cos_r = np.abs(Vhb @ Vhf[:ki].T).max(axis=0)
    assert feats["intruder_dims_right"] == int(np.sum(max_cos_r < 0.5))
    assert (feats["intruder_k"], feats["intruder_base_vectors"]) == (ki, min(shape))
    assert feats["top_sv_shift"] == pytest.approx((Sf[0] - Sb[0]) / Sb[0], rel=1e-8)
    assert np.allclose(feats["top_sv_shifts"], (Sf[:k] - Sb[:k]) / Sb[:k], rtol=1e-8)
    assert feats["stable_rank"] == pytest.approx(np.sum(Sd**2) / Sd[0] ** 2, rel=1e-10)
    assert feats["fro_norm"] == pytest.approx(np.linalg.norm(dW), rel=1e-10)
    assert feats["subspace_overlap_chance"] == pytest.approx(k / out)
    strict = module_features(mod, full, W, k=k, intruder_k=ki, intruder_threshold=0.99)
    assert strict["intruder_dims"] == int(np.sum(max_cos < 0.99)) >= feats["intruder_dims"]

    # Against the top-k base vectors only (the old definition), a fine-tuned vector that
    # aligns with a base vector beyond the k-th would count as an intruder.
    top_only = module_features(mod, full.truncated(k), W, intruder_k=ki)
    assert top_only["intruder_base_vectors"] == k
    assert top_only["intruder_dims"] == int(np.sum(np.abs(Ub[:, :k].T @ Uf[:, :ki]).max(0) < 0.5))
    assert top_only["subspace_overlap"] == pytest.approx(feats["subspace_overlap"], rel=1e-8)

    # With only W, the base's top k are computed from it; without W only overlaps are set.
    from_w = module_features(mod, None, W, k=k, intruder_k=ki)
    assert from_w["intruder_dims"] == top_only["intruder_dims"]
    only_base = module_features(mod, full, k=k)
    assert only_base["subspace_overlap"] == pytest.approx(feats["subspace_overlap"], rel=1e-8)
    assert math.isnan(only_base["intruder_dims"]) and only_base["top_sv_shifts"] is None


def test_intruder_dimension_counted_against_all_base_vectors():
    """A ΔW that lifts the base's 6th direction to the top is no intruder (it is a base
    vector), but it is one when only the base's top 3 vectors are compared."""
    rng = np.random.default_rng(3)
    out, inp = 20, 16
    U, _ = np.linalg.qr(rng.standard_normal((out, out)))
    V, _ = np.linalg.qr(rng.standard_normal((inp, inp)))
    S = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    W = (U[:, :inp] * S) @ V.T
    # rank-1 update along the base's 6th singular pair, large enough to become the top one
    A, B = 20 * V[:, 5][None, :], U[:, 5][:, None]
    mod = LoraModule("m.layers.0.q_proj", A, B, 1.0, 1, 1.0, False)
    full = BaseModuleSpectrum(*np.linalg.svd(W, full_matrices=False))
    paper = module_features(mod, full, W, k=3, intruder_k=1)
    assert paper["intruder_dims"] == 0 and paper["intruder_base_vectors"] == inp
    top3 = module_features(mod, full.truncated(3), W, intruder_k=1)
    assert top3["intruder_dims"] == 1


def test_pattern_matching_is_peft_s():
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = ["layers.1.self_attn.q_proj", "down_proj", "^model.layers.0.*v_proj", "k_proj"]
    names = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.xk_proj",
    ]
    for name in names:
        assert get_pattern_key(patterns, name) == peft_get_pattern_key(patterns, name)


# ----------------------------------------------------------------- against PEFT


def test_plain_llama_adapter_matches_peft_merge(tmp_path):
    from peft import LoraConfig

    deltas, scales = _make_adapter(
        _llama, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ATTN), tmp_path
    )
    assert read_adapter_config(tmp_path)["peft_type"] == "LORA"
    df = adapter_spectrum(tmp_path)
    assert list(df.columns[:2]) == ["module", "singular_values"]
    assert df["module"].iloc[0] == "model.layers.0.self_attn.k_proj"  # natural name order
    _assert_svs_match(df, deltas, 1e-5)
    assert dict(zip(df["module"], df["scale"], strict=True)) == pytest.approx(scales)
    assert df["subspace_overlap"].isna().all()


def test_rslora_and_patterns_match_peft(llama_patterns_adapter):
    path, deltas, scales = llama_patterns_adapter
    mods = {m.name: m for m in iter_lora_modules(path)}
    assert {n: m.scale for n, m in mods.items()} == pytest.approx(scales)
    assert mods["model.layers.1.self_attn.q_proj"].rank == 2
    assert mods["model.layers.0.self_attn.q_proj"].rank == 4
    assert mods["model.layers.0.mlp.down_proj"].rank == 6
    assert mods["model.layers.0.self_attn.v_proj"].alpha == 32
    assert mods["model.layers.0.mlp.up_proj"].alpha == 3
    assert mods["model.layers.1.mlp.up_proj"].alpha == 8
    assert mods["model.layers.0.self_attn.k_proj"].scale == pytest.approx(8 / 2)  # rsLoRA
    _assert_svs_match(adapter_spectrum(path), deltas, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters(tmp_path, dtype, llama_patterns_adapter):
    from peft import LoraConfig

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_ALL,
        use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 32, "model.layers.0.mlp.up_proj": 3},
    )
    deltas, _ = _make_adapter(_llama, cfg, tmp_path, dtype=dtype)
    df = adapter_spectrum(tmp_path)
    _assert_svs_match(df, deltas, 1e-5)
    # and close to the float32 adapter made from the same random draws
    fp32 = adapter_spectrum(llama_patterns_adapter[0]).set_index("module")["singular_values"]
    for _, row in df.iterrows():
        ref = np.asarray(fp32[row["module"]])
        assert np.abs(np.asarray(row["singular_values"]) - ref).max() / ref[0] < 2e-2


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from peft import LoraConfig

    adapter = tmp_path / "adapter"
    base_dir = tmp_path / "base"
    _gpt2().save_pretrained(str(base_dir))
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    deltas, _ = _make_adapter(_gpt2, cfg, adapter)
    assert deltas["transformer.h.0.attn.c_attn"].shape == (144, 48)  # out × in

    df = adapter_spectrum(adapter, base_dir=base_dir, top_k=4)
    _assert_svs_match(df, deltas, 1e-5)
    assert df["fan_in_fan_out"].all()
    row = df.set_index("module").loc["transformer.h.1.mlp.c_fc"]
    assert (row["out_features"], row["in_features"]) == (192, 48)

    # Base-relative features use the base weight transposed to out × in.
    W = load_base_weight(base_dir, "transformer.h.1.mlp.c_fc").T
    Sb = np.linalg.svd(W, compute_uv=False)
    Sf = np.linalg.svd(W + deltas["transformer.h.1.mlp.c_fc"], compute_uv=False)
    assert row["top_sv_shift"] == pytest.approx((Sf[0] - Sb[0]) / Sb[0], rel=1e-5)
    spectra = compute_base_spectrum(base_dir, ["c_fc"], 4, fan_in_fan_out=True)
    assert spectra["transformer.h.1.mlp.c_fc"].U.shape == (192, 4)
    assert np.allclose(spectra["transformer.h.1.mlp.c_fc"].S, Sb[:4], rtol=1e-10)


def test_base_spectrum_sharded_roundtrip_and_full_features(
    tmp_path, llama_base_dir, llama_sharded_dir, llama_patterns_adapter
):
    assert (llama_sharded_dir / "model.safetensors.index.json").is_file()
    spectra = compute_base_spectrum(llama_sharded_dir, LLAMA_ALL, 6)
    assert len(spectra) == 2 * len(LLAMA_ALL)
    W = load_base_weight(llama_base_dir, "model.layers.1.mlp.down_proj")
    assert W.shape == (64, 96)
    s = spectra["model.layers.1.mlp.down_proj"]
    assert np.allclose(s.S, np.linalg.svd(W, compute_uv=False)[:6], rtol=1e-10)
    assert np.allclose(
        (s.U * s.S) @ s.Vh,
        (lambda u, x, v: (u[:, :6] * x[:6]) @ v[:6])(*np.linalg.svd(W, full_matrices=False)),
    )

    path = tmp_path / "spec.safetensors"
    save_base_spectrum(spectra, path)
    loaded = load_base_spectrum(path)
    assert set(loaded) == set(spectra)
    assert np.array_equal(
        loaded["model.layers.0.self_attn.k_proj"].U, spectra["model.layers.0.self_attn.k_proj"].U
    )

    adapter = llama_patterns_adapter[0]
    from_files = adapter_spectrum(adapter, base_dir=llama_base_dir, base_spectrum=loaded)
    computed = adapter_spectrum(adapter, base_dir=llama_sharded_dir, top_k=6)
    cols = ["subspace_overlap", "subspace_overlap_right", "intruder_dims", "top_sv_shift"]
    assert from_files[cols].notna().all().all()
    pd.testing.assert_frame_equal(from_files[cols], computed[cols], rtol=1e-8)
    assert (from_files["base_k"] == 6).all()


# ------------------------------------------------------------- unsupported input


def test_unsupported_adapters_are_refused(tmp_path):
    from peft import LoHaConfig, LoraConfig, get_peft_model

    dora = tmp_path / "dora"
    get_peft_model(
        _llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    ).save_pretrained(str(dora))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        adapter_spectrum(dora)
    # DoRA tensors are caught even when the config does not say so
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match="lora_magnitude_vector"):
        iter_lora_modules(dora)

    loha = tmp_path / "loha"
    get_peft_model(_llama(), LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(loha))
    with pytest.raises(UnsupportedAdapterError, match="LOHA"):
        adapter_spectrum(loha)

    emb = tmp_path / "emb"
    get_peft_model(_llama(), LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(
        str(emb)
    )
    with pytest.raises(UnsupportedAdapterError, match="embedding"):
        adapter_spectrum(emb)

    for extra, match in [
        ({"init_lora_weights": "pissa_niter_4"}, "changed the base weights"),
        ({"init_lora_weights": "olora"}, "changed the base weights"),
        ({"bias": "all"}, "trained biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ]:
        cfg_dir = tmp_path / f"cfg_{len(extra)}_{match[:4]}_{next(iter(extra.values()))!s:.5}"
        cfg_dir.mkdir()
        (cfg_dir / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **extra})
        )
        with pytest.raises(UnsupportedAdapterError, match=match):
            read_adapter_config(cfg_dir)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        adapter_spectrum(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter_config(tmp_path / "empty")


# ------------------------------------------------------------------------ CLI


def test_lab_spectrum_end_to_end(tmp_path, llama_base_dir, llama_patterns_adapter, capsys):
    adapter, deltas, _ = llama_patterns_adapter
    out = tmp_path / "out" / "spectrum.parquet"
    assert (
        main(
            [
                "spectrum",
                str(adapter),
                "--base",
                str(llama_base_dir),
                "--top-k",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "14 modules" in printed

    table = pq.read_table(out)
    assert table.column_names[:2] == ["module", "singular_values"]
    sv_type = table.schema.field("singular_values").type
    assert pa.types.is_list(sv_type) and pa.types.is_float64(sv_type.value_type)
    df = table.to_pandas()
    _assert_svs_match(df, deltas, 1e-5)
    assert df["intruder_dims"].notna().all()

    out2 = tmp_path / "nobase.parquet"
    assert main(["spectrum", str(adapter), "--out", str(out2)]) == 0
    write_spectrum_parquet(adapter_spectrum(adapter), tmp_path / "again.parquet")
    assert pq.read_table(out2).num_rows == 14

    assert main(["spectrum", str(tmp_path / "missing"), "--out", str(out2)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "loha").mkdir()
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    assert main(["spectrum", str(tmp_path / "loha"), "--out", str(out2)]) == 2
    assert "unsupported adapter" in capsys.readouterr().err


def test_base_spectrum_is_complete_up_to_a_size_and_top_k_beyond(llama_base_dir):
    spectra = compute_base_spectrum(llama_base_dir, ["k_proj", "down_proj"], 6, full_up_to=32)
    top = compute_base_spectrum(llama_base_dir, ["k_proj", "down_proj"], 6)
    everything = compute_base_spectrum(llama_base_dir, ["k_proj", "down_proj"], None)
    k_proj, down = "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"
    assert spectra[k_proj].k == everything[k_proj].k == 32  # 32 × 64: complete
    assert spectra[down].k == top[down].k == 6  # 64 × 96: top 6 only
    assert everything[down].k == 64
    assert np.allclose(spectra[k_proj].S[:6], top[k_proj].S)
