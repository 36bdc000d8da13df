"""The dated catalog and what follows from it, without a server: prices, GPU counts per
machine type, the failover order with a fallback GPU, the settings it refuses, the network."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.catalog import (
    CATALOG_FILE,
    FIXED_GPUS,
    default_catalog,
    fixed_gpus,
)
from resources.compute.gce.settings import LaunchSettings


def _settings(**kw) -> LaunchSettings:
    base = dict(
        project="lab-test-project",
        zones=["us-central1-a", "us-central1-b"],
        machine_type="g2-standard-8",
        gpu_type="nvidia-l4",
        storage_root="gs://bucket/root",
        experiment="exp",
    )
    return LaunchSettings(**{**base, **kw})


def test_the_catalog_is_dated_and_prices_what_the_lab_launches():
    head = CATALOG_FILE.read_text().splitlines()[:12]
    assert any("skypilot-catalog" in ln for ln in head)
    assert any("vendored: 2026-11-25" in ln for ln in head)
    assert any("refresh_gcp_catalog.py" in ln for ln in head)
    cat = default_catalog()
    for m in [f"g2-standard-{n}" for n in (4, 8, 12, 16, 24, 32, 48, 96)] + [
        "a2-highgpu-1g",
        "a2-highgpu-2g",
        "a2-highgpu-4g",
        "a2-highgpu-8g",
        "a2-ultragpu-1g",
        "a3-highgpu-1g",
    ]:
        assert cat.zones_for(m), m
        assert m in FIXED_GPUS
    for gpu in ("nvidia-l4", "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb"):
        assert any(g == gpu for g, _ in cat.gpus), gpu
    # spot is cheaper than on-demand wherever both are listed
    for table in (cat.machines, cat.gpus):
        for key, p in table.items():
            assert p.spot is not None and p.on_demand is not None and p.spot < p.on_demand, key
    assert "us-central1-a" in cat.zones_for("a2-highgpu-1g", "nvidia-tesla-a100")
    assert cat.zones_for("a2-ultragpu-1g") == [
        "europe-west4-a",
        "us-central1-a",
        "us-central1-c",
        "us-east4-c",
    ]


def test_gpu_count_follows_the_machine_type():
    assert fixed_gpus("g2-standard-24") == ("nvidia-l4", 2)
    assert fixed_gpus("g2-standard-48") == ("nvidia-l4", 4)
    assert fixed_gpus("a2-highgpu-4g") == ("nvidia-tesla-a100", 4)
    assert fixed_gpus("n1-standard-8") is None  # N1 takes GPUs attached by count
    s = _settings(gpu_zones={"nvidia-l4": {"us-central1-a": ["g2-standard-8", "g2-standard-24"]}})
    got = [(p.zone, p.machine_type, p.gpu_count) for p in s.placements()]
    assert got == [("us-central1-a", "g2-standard-8", 1), ("us-central1-a", "g2-standard-24", 2)]
    # the price and the body follow the count: 2 L4s on the g2-standard-24
    p24 = s.placements()[1]
    cat = default_catalog()
    assert s.price(p24) == pytest.approx(
        cat.machine_price("g2-standard-24", "us-central1-a", True)
        + 2 * cat.gpu_price("nvidia-l4", "us-central1-a", True)
    )
    spec = vmbody.VmSpec(
        project="p",
        zone=p24.zone,
        name="vm",
        machine_type=p24.machine_type,
        source_image="img",
        gpu_type=p24.gpu_type,
        gpu_count=p24.gpu_count,
    )
    body = json.loads(vmbody.instance_json(vmbody.build_instance(spec)))
    assert body["guestAccelerators"][0]["acceleratorCount"] == 2


def test_a_fallback_gpu_follows_every_candidate_of_the_first():
    s = _settings(
        spot=False,
        fallback_gpu_types=["nvidia-tesla-a100"],
        gpu_zones={
            "nvidia-l4": {"us-central1-a": ["g2-standard-8"], "us-central1-b": ["g2-standard-8"]},
            "nvidia-tesla-a100": {"us-central1-b": ["a2-highgpu-1g"]},
        },
    )
    got = [(p.zone, p.machine_type, p.gpu_type) for p in s.placements(avoid=("us-central1-a",))]
    assert got == [
        ("us-central1-b", "g2-standard-8", "nvidia-l4"),
        ("us-central1-a", "g2-standard-8", "nvidia-l4"),  # just preempted: last of the L4s
        ("us-central1-b", "a2-highgpu-1g", "nvidia-tesla-a100"),
    ]
    # an overridden machine type is the one choice: no fallback GPU on it
    only = _settings(**{**s.model_dump(), "machine_type_override": "g2-standard-16"})
    assert {(p.machine_type, p.gpu_type) for p in only.placements()} == {
        ("g2-standard-16", "nvidia-l4")
    }
    a100 = s.placements()[-1]
    assert s.price(a100) == pytest.approx(0.73948 + 2.93391)  # on-demand, us-central1
    # an override wins over the catalog, per part
    s2 = _settings(spot=False, hourly_usd={"g2-standard-8": 1.0})
    assert s2.price(s2.placements()[0]) == pytest.approx(1.0 + 0.56004)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"machine_type": "a2-highgpu-1g"}, "comes with 1 x nvidia-tesla-a100"),
        ({"gpu_zones": {"nvidia-l4": {"us-central1-a": ["a2-highgpu-1g"]}}}, "cannot host"),
        ({"fallback_gpu_types": ["nvidia-tesla-a100"]}, "needs a gpu_zones entry"),
    ],
)
def test_settings_refuse_machine_types_that_cannot_host_the_gpu(kw, message):
    with pytest.raises(ValidationError, match=message):
        _settings(**kw)


def test_network_subnetwork_and_external_ip_are_settings():
    s = _settings(subnetwork="regions/us-central1/subnetworks/lab", external_ip=False)
    from resources.compute.gce.step_vm import build_vm_spec

    p = s.placements()[0]
    spec = build_vm_spec(
        s,
        placement=p,
        name="vm",
        source_image="img",
        prebaked=True,
        launch_uri="gs://bucket/root/exp/_launches/r/adapter",
        attempt=1,
        run_id="r",
        step_key="adapter",
        partition="m|r",
        launch_info={},
    )
    body = json.loads(vmbody.instance_json(vmbody.build_instance(spec)))
    (nic,) = body["networkInterfaces"]
    assert nic["network"] == "global/networks/default"
    assert nic["subnetwork"] == "regions/us-central1/subnetworks/lab"
    assert "accessConfigs" not in nic  # no external IP
    default = json.loads(
        vmbody.instance_json(vmbody.build_instance(vmbody.VmSpec("p", "z", "vm", "m", "img")))
    )
    assert default["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
