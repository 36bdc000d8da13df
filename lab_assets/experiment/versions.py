"""What each partition should be built from: recipes, fingerprints and staleness reasons.

A partition's *recipe* is its asset's code version, a digest of exactly the config
that shapes it (its run's hyper-parameters and task generator, its base model's
source, the spectrum or classification settings) and the fingerprints of the
upstream partitions it reads. Its *fingerprint* is the digest of the recipe. So a
change anywhere propagates down the graph by construction: edit one run's
learning rate and that adapter, its spectral features and the classification get
new fingerprints, nothing else does; bump the spectral code version and every
`spectral_features` partition (and the classification) does, no adapter does.

The fingerprint is recorded as the partition's Dagster data version and, with the
recipe, in its storage manifest. Comparing recorded against expected is how the
sweep decides what is stale and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lab_assets.experiment.keys import adapter_key
from lab_assets.experiment.resolved import Experiment, digest
from lab_assets.ml.tasks import TASK_GENERATOR_VERSION

# Bump an asset's version when its code changes what it produces.
CODE_VERSIONS = {
    "base_model": "3",
    "base_spectrum": "2",
    "adapter": "3",
    "spectral_features": "2",
    "classification_results": "2",
}
ASSET_ORDER = tuple(CODE_VERSIONS)


@dataclass(frozen=True)
class Recipe:
    code: str
    config: str
    inputs: dict[str, str]  # "asset[partition]" -> fingerprint
    # The config values behind `config`, flat ("source.hidden_size": 64), so a difference
    # can name the field. Shown, never hashed: fingerprints stay what they were.
    values: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def fingerprint(self) -> str:
        return digest({"code": self.code, "config": self.config, "inputs": self.inputs})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "config": self.config, "inputs": dict(self.inputs)}
        if self.values:
            d["values"] = dict(self.values)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(
            str(d["code"]),
            str(d["config"]),
            dict(d.get("inputs") or {}),
            dict(d.get("values") or {}),
        )

    def differences(self, recorded: Recipe) -> list[str]:
        """Why `recorded` (what was built) is not this recipe (what should be built).

        Each reason names what changed: `code version 1 → 2`, `learning_rate 0.001 →
        0.002`, `input adapter[…] changed`. A record made before recipes kept their
        values says `config changed`.
        """
        why = []
        if recorded.code != self.code:
            why.append(f"code version {recorded.code} → {self.code}")
        if recorded.config != self.config:
            why.extend(changed_fields(recorded.values, self.values) or ["config changed"])
        for name, fp in sorted(self.inputs.items()):
            if recorded.inputs.get(name) != fp:
                why.append(f"input {name} changed")
        for name in sorted(set(recorded.inputs) - set(self.inputs)):
            why.append(f"input {name} removed")
        return why


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field old → new` for every field whose value differs; [] when `old` was not recorded."""
    if not old or not new:
        return []
    return [
        f"{k} {_show(old.get(k, _ABSENT))} → {_show(new.get(k, _ABSENT))}"
        for k in sorted(set(old) | set(new))
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]


_ABSENT = object()


def _show(v: Any) -> str:
    if v is _ABSENT:
        return "(unset)"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON-able config as one level of dotted keys."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def ref(asset: str, partition: str | None) -> str:
    return f"{asset}[{partition}]" if partition is not None else asset


def _base_spectrum_config(exp: Experiment) -> dict[str, Any]:
    sp = exp.file.spectrum
    out: dict[str, Any] = {"top_k": sp.top_k, "targets": exp.target_modules()}
    if sp.base_k is not None:  # absent (all triplets) keeps the digest of before
        out["base_k"] = sp.base_k
    return out


def config_digest(exp: Experiment, asset: str, partition: str | None) -> str:
    """Digest of exactly the config that shapes this partition."""
    if asset == "base_model":
        return exp.model_fingerprint(partition)
    if asset == "base_spectrum":
        return digest(_base_spectrum_config(exp))
    if asset == "adapter":
        run = exp.run(partition.split("|", 1)[1])
        return digest({"run": run.fingerprint(), "task_generator": TASK_GENERATOR_VERSION})
    if asset == "spectral_features":
        return digest(exp.file.spectrum.model_dump(mode="json"))
    if asset == "classification_results":
        return digest(exp.file.classification.model_dump(mode="json"))
    raise KeyError(asset)


def config_values(exp: Experiment, asset: str, partition: str | None) -> dict[str, Any]:
    """The config values `config_digest` is made of, flat, for naming what changed."""
    if asset == "base_model":
        return flatten(exp.model(partition).model_dump(mode="json"))
    if asset == "base_spectrum":
        return _base_spectrum_config(exp)
    if asset == "adapter":
        run = exp.run(partition.split("|", 1)[1])
        values = {"method": run.method, "task": run.task, "seed": run.seed, "arm": run.arm}
        return (
            values
            | flatten(run.hyper.model_dump(mode="json"))
            | {"task_generator": TASK_GENERATOR_VERSION}
        )
    if asset == "spectral_features":
        return flatten(exp.file.spectrum.model_dump(mode="json"))
    if asset == "classification_results":
        return flatten(exp.file.classification.model_dump(mode="json"))
    raise KeyError(asset)


def upstream(exp: Experiment, asset: str, partition: str | None) -> list[tuple[str, str | None]]:
    """The partitions this partition reads."""
    if asset == "base_model":
        return []
    if asset == "base_spectrum":
        return [("base_model", partition)]
    model = partition.split("|", 1)[0] if partition else None
    if asset == "adapter":
        return [("base_model", model)]
    if asset == "spectral_features":
        return [("adapter", partition), ("base_spectrum", model), ("base_model", model)]
    if asset == "classification_results":
        return [("spectral_features", k) for k in all_partitions(exp, "spectral_features")]
    raise KeyError(asset)


def all_partitions(exp: Experiment, asset: str) -> list[str | None]:
    if asset in ("base_model", "base_spectrum"):
        return list(exp.model_ids)
    if asset in ("adapter", "spectral_features"):
        return [str(adapter_key(m, r)) for m in exp.model_ids for r in exp.run_ids]
    return [None]


def recipe(exp: Experiment, asset: str, partition: str | None, inputs: dict[str, str]) -> Recipe:
    return Recipe(
        CODE_VERSIONS[asset],
        config_digest(exp, asset, partition),
        inputs,
        config_values(exp, asset, partition),
    )


def expected_recipes(exp: Experiment) -> dict[tuple[str, str | None], Recipe]:
    """The recipe every partition of the experiment should have, upstream first."""
    out: dict[tuple[str, str | None], Recipe] = {}
    for asset in ASSET_ORDER:
        for p in all_partitions(exp, asset):
            inputs = {ref(a, q): out[(a, q)].fingerprint for a, q in upstream(exp, asset, p)}
            out[(asset, p)] = recipe(exp, asset, p, inputs)
    return out
