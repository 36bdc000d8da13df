"""UI metadata helpers: rounding, typed values and tables, the headline, stored-file links."""

from __future__ import annotations

from dagster import (
    BoolMetadataValue,
    FloatMetadataValue,
    IntMetadataValue,
    NullMetadataValue,
    PathMetadataValue,
    TextMetadataValue,
    UrlMetadataValue,
)

from lab_assets.defs.metadata import headline, p_value_text, prefixed, sig, table, typed
from lab_assets.ml.model_card import model_card
from resources.io_manager import storage_link
from resources.storage.links import gcs_console_url


def test_floats_are_rounded_and_values_typed():
    assert sig(4.914255619049072) == 4.914 and sig(0.000123456) == 0.0001235
    meta = prefixed("hp", {"learning_rate": 0.003, "rank": 8, "method": "dpo", "rslora": False})
    assert isinstance(meta["hp/learning_rate"], FloatMetadataValue)
    assert isinstance(meta["hp/rank"], IntMetadataValue)
    assert isinstance(meta["hp/method"], TextMetadataValue)
    assert isinstance(meta["hp/rslora"], BoolMetadataValue)
    assert isinstance(typed(None), NullMetadataValue)
    assert typed(("q_proj", "v_proj")).value == "q_proj, v_proj"


def test_tables_have_a_schema_and_rounded_cells():
    t = table([("features", str), ("accuracy", float)], [["scale_free", 0.96666666]]).value
    assert [(c.name, c.type) for c in t.schema.columns] == [
        ("features", "string"),
        ("accuracy", "float"),
    ]
    assert t.records[0].data == {"features": "scale_free", "accuracy": 0.9667}


def test_headline_reads_at_a_glance():
    res = {"accuracy": 0.96666, "ci_low": 0.8333, "ci_high": 0.9912, "p_value": 1 / 201}
    line = headline("task", res | {"chance": 1 / 3}, floor=1 / 201)
    assert line == "task 0.967 [0.83, 0.99], p < 0.005 vs chance 0.333"
    assert p_value_text(0.2243, 1 / 201) == "p = 0.224"
    assert p_value_text(1 / 11, 1 / 11) == "p < 0.091"


def test_stored_locations_are_paths_or_console_urls():
    assert isinstance(storage_link("/data/lab/small/adapter/m|r"), PathMetadataValue)
    link = storage_link("gs://bkt/lab/small/adapter/m|r")
    assert isinstance(link, UrlMetadataValue)
    assert (
        link.value == "https://console.cloud.google.com/storage/browser/bkt/lab/small/adapter/m%7Cr"
    )
    assert gcs_console_url("gs://bkt/p/x.png", is_file=True).endswith(
        "/browser/_details/bkt/p/x.png"
    )


def test_model_card_front_matter_names_a_hub_base_and_its_revision():
    card = model_card(
        title="dpo-arith-r8-s0 on qwen",
        base_model="Qwen/Qwen2.5-0.5B",
        base_revision="abc123",
        hyper={"method": "dpo", "learning_rate": 0.001},
        heldout={"metric_name": "exact_match", "task_metric": 0.5, "beats_base": True},
        tags=("dpo",),
    )
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert 'base_model: "Qwen/Qwen2.5-0.5B"' in front and "library_name: peft" in front
    assert '- "lora"' in front and '- "dpo"' in front
    assert 'from_pretrained("Qwen/Qwen2.5-0.5B", revision="abc123")' in body
    assert "| learning_rate | 0.001 |" in body and "| adapter, task metric | 0.5 |" in body
