"""Finding, reading and validating an experiment file.

Which file: ``--experiment PATH``, else ``$LAB_EXPERIMENT``, else
``./experiments/tiny.yaml`` relative to the current directory. The storage root is
the file's ``storage`` (relative to the file), overridden by ``$LAB_STORAGE_ROOT``
(relative to the current directory).

Values may come from the environment, so that one shipped file serves every
project: ``${NAME}`` is the variable's value (unset: an error naming the variable
to set), ``${NAME:-default}`` falls back to ``default`` and records NAME as a
placeholder (``Experiment.placeholders``): the file validates and dry-runs as is,
and every command that would touch the cloud refuses until NAME is set. ``$${``
is a literal ``${``; comment lines are left alone. The experiment keeps the text
with the values filled in, so a step elsewhere (a VM) sees the same values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from lab_assets.experiment.resolved import Experiment, check_analysis, expand_runs
from lab_assets.experiment.schema import ExperimentError, ExperimentFile
from resources.remote.protocol import GsUriError, parse_gs_uri

EXPERIMENT_ENV = "LAB_EXPERIMENT"
STORAGE_ENV = "LAB_STORAGE_ROOT"
# Set (to 1) where several experiments share one Dagster instance: every asset key is
# prefixed with its experiment's name (`tiny/adapter`), so the keys never collide.
PREFIX_ENV = "LAB_PREFIX_ASSET_KEYS"
DEFAULT_EXPERIMENT = Path("experiments") / "tiny.yaml"  # relative to the current directory
_VAR = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, path: Path) -> tuple[str, tuple[str, ...]]:
    """`text` with ``${NAME}`` / ``${NAME:-default}`` filled from the environment, and the
    names that fell back to their default (placeholders)."""
    placeholders: list[str] = []
    missing: list[str] = []

    def fill(m: re.Match) -> str:
        escaped, name, default = m.groups()
        if escaped:
            return m.group(0)[1:]  # $${X} -> ${X}
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            if name not in placeholders:
                placeholders.append(name)
            return default
        missing.append(name)
        return m.group(0)

    lines = [
        line if line.lstrip().startswith("#") else _VAR.sub(fill, line)
        for line in text.splitlines(keepends=True)
    ]
    if missing:
        names = ", ".join(dict.fromkeys(missing))
        raise ExperimentError(
            f"{path}: the file uses ${{{missing[0]}}} but it is not set: set {names} in the "
            f"environment (e.g. export {missing[0]}=...)"
        )
    return "".join(lines), tuple(placeholders)


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    errors = err.errors()
    for e in errors:
        if e["type"] == "too_short" and any(
            o["loc"][: len(e["loc"])] == e["loc"] and len(o["loc"]) > len(e["loc"]) for o in errors
        ):
            continue  # pydantic counts a list whose items failed as empty: the items say why
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{path}: {loc}: {msg}")
    return "invalid experiment file\n  " + "\n  ".join(lines)


def resolve_storage_root(raw: str, relative_to: Path) -> str:
    """A `gs://` URI as is; a local path made absolute (relative to `relative_to`)."""
    if raw.startswith("gs://"):
        try:
            parse_gs_uri(raw)
        except GsUriError as e:
            raise ExperimentError(f"storage root: {e}") from None
        return raw.rstrip("/")
    if "://" in raw:
        raise ExperimentError(f"storage root {raw!r}: only local paths and gs:// are supported")
    p = Path(raw).expanduser()
    return str((p if p.is_absolute() else relative_to / p).resolve())


def experiment_path(
    path: str | os.PathLike[str] | None = None, named_by: str = "--experiment"
) -> Path:
    """The experiment file to use: `path` (given as `named_by`, for errors), else
    `$LAB_EXPERIMENT`, else ./experiments/tiny.yaml."""
    if path is not None:
        p, source = Path(path), named_by
    elif os.environ.get(EXPERIMENT_ENV):
        p, source = Path(os.environ[EXPERIMENT_ENV]), f"${EXPERIMENT_ENV}"
    else:
        p, source = DEFAULT_EXPERIMENT, "the default, relative to the current directory"
    p = p.expanduser().resolve()
    if not p.is_file():
        hint = (
            "check the path"
            if source != "--experiment" and path is not None
            else "run from the lab's checkout, or choose a file with --experiment PATH or "
            f"${EXPERIMENT_ENV}=PATH"
        )
        raise ExperimentError(f"{p}: experiment file not found (from {source}); {hint}")
    return p


def load_experiment(
    path: str | os.PathLike[str] | None = None, named_by: str = "--experiment"
) -> Experiment:
    """Find (see `experiment_path`), read and validate an experiment file."""
    p = experiment_path(path, named_by)
    override = os.environ.get(STORAGE_ENV)
    storage_root = resolve_storage_root(override, Path.cwd()) if override else None
    return parse_experiment(p.read_text(), p, storage_root)


def parse_experiment(text: str, path: Path, storage_root: str | None = None) -> Experiment:
    """Validate an experiment document; `storage_root`, if given, overrides the file's `storage`.

    `path` names the file in errors and anchors a relative `storage`; the text need not
    be read from it (a step on a VM rebuilds the experiment from the text it was sent).
    """
    text, placeholders = interpolate(text, path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ExperimentError(f"{path}: the top level must be a mapping of fields")
    try:
        f = ExperimentFile.model_validate(doc)
    except ValidationError as e:
        raise ExperimentError(_format_validation_error(path, e)) from None
    root = storage_root or resolve_storage_root(f.storage, path.parent)
    runs = expand_runs(f, path)
    check_analysis(f, runs, path)
    return Experiment(
        path=path,
        text=text,
        file=f,
        storage_root=root,
        runs=runs,
        placeholders=placeholders,
        asset_prefix=(key_prefix(f.name),) if prefixed_keys() else (),
    )


def prefixed_keys() -> bool:
    """Whether asset keys carry the experiment's name (``$LAB_PREFIX_ASSET_KEYS``)."""
    return os.environ.get(PREFIX_ENV, "").strip().lower() in ("1", "true", "yes")


def key_prefix(name: str) -> str:
    """An experiment name as an asset-key prefix (Dagster allows only [A-Za-z0-9_])."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)
