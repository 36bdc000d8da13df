"""`lab fetch`: copy an experiment's results from its storage root to a local directory.

    lab fetch [--experiment FILE] [--dest DIR] [--include adapters] [--storage ROOT]

Results are ``spectral_features``, ``classification_results`` and ``logs``; adapters
(and base models or spectra) on request. Adapters come with the lab-built base models
their ``adapter_config.json`` names by a relative path (``../../base_model/<model>``),
so they load with PEFT from the destination alone; Hub bases are named by repo id. The
storage root may be local or ``gs://bucket/prefix``. The destination mirrors storage
without the experiment level, ``DEST/<asset>/<partition folder>/<files>`` (the storage's
shell-safe folder names, ``tiny-llama+dpo-arith-r8-s0``) plus each partition's
``manifest.json``, and is *synced*, not copied into: a file whose size and sha256
already match the manifest is skipped, a changed one is replaced (downloaded beside it, checked, then renamed into
place), and a file the manifest no longer lists is removed from that partition's
directory. Running it twice copies nothing the second time and never nests
``results/results``.

``logs`` are the step logs the GCE launcher streams to
``<root>/<experiment>/_launches/<run>/<step>/attempts/<n>/logs/`` (mirrored to
``DEST/logs/<run>/<step>/attempts/<n>/logs/``; the launch bundles, events and
checkpoints beside them are not fetched), plus any raw files under
``<root>/<experiment>/logs/``; they have no manifest, so they are compared by size
and crc32c on GCS, by size and sha256 locally. Logs committed as partitions of a
``logs`` asset are fetched like any asset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lab_assets.cli.common import add_command, add_experiment
from lab_assets.experiment.load import load_experiment, resolve_storage_root
from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import ExperimentError, TinySource
from lab_assets.names import ADAPTER, BASE_MODEL
from resources.storage.base import (
    MANIFEST_NAME,
    ArtifactStore,
    FileEntry,
    Manifest,
    StorageError,
    partition_dirname,
    sha256_file,
)
from resources.storage.local import LocalArtifactStore
from resources.storage.open import open_store

RESULT_ASSETS = ("spectral_features", "classification_results", "logs")
INCLUDE_ALIASES = {
    "adapters": "adapter",
    "base_models": "base_model",
    "base_spectra": "base_spectrum",
}
LOGS = "logs"
# Raw (manifest-less) log sources under <root>/<experiment>/: (prefix, keep a path?).
LOG_SOURCES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("_launches", lambda rel: "logs" in rel.split("/")[:-1]),
    ("logs", lambda rel: True),
)
_STAGING = ".lab-fetch-"


@dataclass
class FetchReport:
    """What a sync did."""

    copied: list[str] = field(default_factory=list)  # DEST-relative paths written
    up_to_date: int = 0
    removed: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    missing_assets: list[str] = field(default_factory=list)


@dataclass
class _PartitionPlan:
    asset: str
    partition: str
    manifest: Manifest
    stale: list[FileEntry]
    extra: list[Path]


def _is_current(path: Path, size: int, sha256: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return sha256_file(path) == sha256


def _plan_partition(dest: Path, asset: str, partition: str, manifest: Manifest) -> _PartitionPlan:
    pdir = dest / asset / partition_dirname(partition)
    stale = [f for f in manifest.files if not _is_current(pdir / f.path, f.size, f.sha256)]
    listed = {f.path for f in manifest.files} | {MANIFEST_NAME}
    extra = []
    if pdir.is_dir():
        for p in sorted(pdir.rglob("*")):
            rel = p.relative_to(pdir).as_posix()
            if p.is_file() and rel not in listed:
                extra.append(p)
    return _PartitionPlan(asset, partition, manifest, stale, extra)


def _replace_into(staging: Path, pdir: Path, rels: list[str]) -> None:
    for rel in rels:
        target = pdir / rel
        if target.is_dir():  # a directory where the manifest now has a file
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target)


def _copy_partition(
    store: ArtifactStore, plan: _PartitionPlan, dest: Path, progress: Callable[[int], None]
) -> None:
    pdir = dest / plan.asset / partition_dirname(plan.partition)
    pdir.mkdir(parents=True, exist_ok=True)
    staging = pdir / f"{_STAGING}{uuid.uuid4().hex[:8]}"
    rels = [f.path for f in plan.stale]
    try:
        if hasattr(store, "download"):  # GCS: straight from the bucket, sha256-checked
            used = store.download(plan.asset, plan.partition, staging, only=rels, progress=progress)
            if used != plan.manifest:
                raise StorageError(
                    f"{store.uri(plan.asset, plan.partition)}: replaced while fetching; run again"
                )
        else:
            src = store.local_path(plan.asset, plan.partition)
            for f in plan.stale:
                (staging / f.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / f.path, staging / f.path)
                if not _is_current(staging / f.path, f.size, f.sha256):
                    raise StorageError(f"{src / f.path}: does not match its manifest")
                progress(f.size)
        _replace_into(staging, pdir, rels)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_manifest(pdir: Path, manifest: Manifest) -> None:
    path = pdir / MANIFEST_NAME
    text = manifest.to_json()
    if path.is_file() and path.read_text() == text:
        return
    pdir.mkdir(parents=True, exist_ok=True)
    tmp = pdir / f"{_STAGING}{MANIFEST_NAME}"
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_empty_dirs(d: Path) -> None:
    for p in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            p.rmdir()
        except OSError:
            pass


@dataclass
class _RawFile:
    rel: str
    size: int
    crc32c: str | None  # GCS
    source: Path | None  # local roots


def _raw_listing(
    store: ArtifactStore, rel_prefix: str, keep: Callable[[str], bool]
) -> list[_RawFile]:
    if isinstance(store, LocalArtifactStore):
        base = Path(store.root) / store.experiment / rel_prefix
        if not base.is_dir():
            return []
        files = [
            _RawFile(p.relative_to(base).as_posix(), p.stat().st_size, None, p)
            for p in sorted(base.rglob("*"))
            if p.is_file()
        ]
    elif hasattr(store, "list_objects"):
        files = [_RawFile(o.path, o.size, o.crc32c, None) for o in store.list_objects(rel_prefix)]
    else:
        return []
    return [f for f in files if keep(f.rel)]


def _raw_is_current(local: Path, f: _RawFile) -> bool:
    try:
        if local.stat().st_size != f.size:
            return False
    except OSError:
        return False
    if f.source is not None:
        return sha256_file(local) == sha256_file(f.source)
    from resources.storage.gcs.session import crc32c_file

    return crc32c_file(local) == f.crc32c


def _sync_raw(
    store: ArtifactStore,
    rel_prefix: str,
    keep: Callable[[str], bool],
    dest: Path,
    report: FetchReport,
    bar,
) -> bool:
    """Mirror the raw files under `<experiment>/<rel_prefix>/` that `keep` accepts."""
    files = _raw_listing(store, rel_prefix, keep)
    if not files:
        return False
    root = dest / LOGS
    stale = [f for f in files if not _raw_is_current(root / f.rel, f)]
    report.up_to_date += len(files) - len(stale)
    bar.total = (bar.total or 0) + sum(f.size for f in stale)
    bar.refresh()
    for f in stale:
        target = root / f.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{_STAGING}{uuid.uuid4().hex[:8]}-{target.name}")
        try:
            if f.source is not None:
                shutil.copyfile(f.source, tmp)
            else:
                store.download_object(f"{rel_prefix}/{f.rel}", tmp, size=f.size)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        bar.update(f.size)
        report.copied.append(target.relative_to(dest).as_posix())
        report.bytes_copied += f.size
    return True


def sync_results(
    store: ArtifactStore,
    assets: list[str],
    dest: Path,
    *,
    show_progress: bool = True,
    only: Mapping[str, Collection[str]] | None = None,
) -> FetchReport:
    """Mirror the given assets' complete partitions from `store` into `dest/<asset>/<key>/`.

    ``only`` restricts an asset to the named partition folders (the others of that asset
    are left alone in `dest`)."""
    from tqdm import tqdm

    dest = Path(dest)
    report = FetchReport()
    plans: list[_PartitionPlan] = []
    raw_assets = []
    for asset in assets:
        keys = store.list_partitions(asset)
        if only is not None and asset in only:
            keys = [k for k in keys if k in only[asset]]
        for key in keys:
            manifest = store.read_manifest(asset, key)
            if manifest is not None:  # None: replaced or deleted since the listing
                plans.append(_plan_partition(dest, asset, key, manifest))
        if not keys:
            if asset == LOGS:
                raw_assets.append(asset)
            else:
                report.missing_assets.append(asset)
    total = sum(f.size for p in plans for f in p.stale)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="lab fetch",
        disable=not show_progress,
        file=sys.stderr,
    ) as bar:
        for plan in plans:
            pdir = dest / plan.asset / partition_dirname(plan.partition)
            report.up_to_date += len(plan.manifest.files) - len(plan.stale)
            if plan.stale:
                _copy_partition(store, plan, dest, bar.update)
                report.copied += [
                    f"{plan.asset}/{partition_dirname(plan.partition)}/{f.path}" for f in plan.stale
                ]
                report.bytes_copied += sum(f.size for f in plan.stale)
            for p in plan.extra:
                p.unlink()
                report.removed.append(p.relative_to(dest).as_posix())
            if plan.extra:
                _remove_empty_dirs(pdir)
            _write_manifest(pdir, plan.manifest)
        for asset in raw_assets:
            found = [
                _sync_raw(store, prefix, keep, dest, report, bar) for prefix, keep in LOG_SOURCES
            ]
            if not any(found):
                report.missing_assets.append(asset)
    return report


def _assets(includes: list[str]) -> list[str]:
    out = list(RESULT_ASSETS)
    for item in includes:
        for name in filter(None, (s.strip() for s in item.split(","))):
            asset = INCLUDE_ALIASES.get(name, name)
            if asset not in out:
                out.append(asset)
    return out


def _bases_named_by_adapters(exp: Experiment, assets: list[str]) -> dict[str, set[str]]:
    """With adapters and without base models: the lab-built bases, whose adapters name them
    by a path relative to their directory (``../../base_model/<model>``), so the fetched
    adapters load where the storage root does not exist. Hub bases are named by repo id."""
    if ADAPTER not in assets or BASE_MODEL in assets:
        return {}
    built = {m for m in exp.model_ids if isinstance(exp.model(m).source, TinySource)}
    return {BASE_MODEL: built} if built else {}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "fetch",
        purpose="Sync an experiment's results from its storage root into a local directory.",
        help="copy an experiment's results to a local directory",
        examples=[
            "lab fetch --experiment experiments/tiny.yaml --dest results",
            "lab fetch --include adapters --storage gs://my-bucket/lab",
        ],
        fn=_cmd_fetch,
    )
    add_experiment(parser)
    parser.add_argument(
        "--dest", default="results", help="local directory to sync into (default: ./results)"
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="WHAT",
        help="also fetch: adapters, base_models, base_spectra or an asset name "
        "(repeatable or comma-separated)",
    )
    parser.add_argument(
        "--storage", help="storage root to read (default: the experiment's or $LAB_STORAGE_ROOT)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        exp = load_experiment(args.experiment)
        root = resolve_storage_root(args.storage, Path.cwd()) if args.storage else exp.storage_root
    except ExperimentError as e:
        print(f"lab fetch: {e}", file=sys.stderr)
        return 2
    dest = Path(args.dest).expanduser().resolve()
    assets = _assets(args.include)
    bases = _bases_named_by_adapters(exp, assets)
    print(f"experiment {exp.name}: syncing {', '.join(assets)} from {root} into {dest}")
    if bases:
        assets.append(BASE_MODEL)
        names = ", ".join(sorted(bases[BASE_MODEL]))
        print(f"  with the lab-built base models the adapters name: {names}")
    try:
        store = open_store(root, exp.name)
        report = sync_results(store, assets, dest, show_progress=not args.no_progress, only=bases)
    except StorageError as e:
        print(f"lab fetch: {e}", file=sys.stderr)
        return 1
    print(
        f"copied {len(report.copied)} files ({_mb(report.bytes_copied)}), "
        f"{report.up_to_date} already up to date, removed {len(report.removed)}"
    )
    if report.missing_assets:
        print(f"nothing stored yet for: {', '.join(report.missing_assets)}")
    return 0
