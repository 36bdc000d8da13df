"""The model cache tier by tier: local disk, the GCS cache (on the emulator), the Hub.

The Hub is a local stand-in: a small HTTP server speaking the endpoints that
`huggingface_hub.snapshot_download` (2.x) calls, read from its source:

- `GET /api/models/{repo}/revision/{rev}`: repo info (`sha`, `siblings`), used to
  resolve a tag to a commit;
- `GET /api/models/{repo}/tree/{commit}?recursive=...`: the file listing (one page,
  no `Link` header);
- `HEAD`/`GET /{repo}/resolve/{commit}/{file}`: file metadata then bytes; the HEAD
  must carry `X-Repo-Commit`, an `ETag` and `Content-Length`.

It serves a real tiny model built here (random-weight `LlamaForCausalLM`, saved with
`save_pretrained`) and counts the downloads it answers, so each test can tell which
tier served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lab_assets_tests.fakes.gcs_emulator import Emulator
from resources.model_cache import MARKER, ModelCache, ModelCacheError, safetensors_problem
from resources.storage.gcs.client import make_client, retry_policy
from resources.storage.gcs.session import GCSSession

REPO = "lab-test/tiny-llama"
TAG = "v1.0"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    """Serves one repo at one commit (reachable by tag or sha) from a local directory."""

    def __init__(self, repo_id: str, files_dir: Path):
        self.repo_id = repo_id
        self.files = {
            p.relative_to(files_dir).as_posix(): p.read_bytes()
            for p in sorted(files_dir.rglob("*"))
            if p.is_file()
        }
        self.downloads: list[str] = []
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._serve(self, body=True)

            def do_HEAD(self):
                hub._serve(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        info = f"/api/models/{self.repo_id}/revision/"
        tree = f"/api/models/{self.repo_id}/tree/"
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(info) and path[len(info) :] in (TAG, COMMIT):
            doc = {
                "id": self.repo_id,
                "sha": COMMIT,
                "siblings": [{"rfilename": f} for f in self.files],
            }
            return self._json(h, doc, body)
        if path.startswith(tree) and path[len(tree) :].rstrip("/") == COMMIT:
            entries = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for name, data in self.files.items()
            ]
            return self._json(h, entries, body)
        if path.startswith(resolve):
            rev, _, name = path[len(resolve) :].partition("/")
            if rev in (TAG, COMMIT) and name in self.files:
                data = self.files[name]
                h.send_response(200)
                h.send_header("Content-Type", "application/octet-stream")
                h.send_header("Content-Length", str(len(data)))
                h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                h.send_header("X-Repo-Commit", COMMIT)
                h.send_header("Accept-Ranges", "bytes")
                h.end_headers()
                if body:
                    self.downloads.append(name)
                    h.wfile.write(data)
                return None
        msg = json.dumps({"error": f"not found: {path}"}).encode()
        h.send_response(404)
        h.send_header("Content-Type", "application/json")
        code = "RevisionNotFound" if path.startswith((info, tree)) else "EntryNotFound"
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Length", str(len(msg)))
        h.end_headers()
        if body:
            h.wfile.write(msg)
        return None

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, doc, body: bool) -> None:
        data = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Repo-Commit", COMMIT)
        h.end_headers()
        if body:
            h.wfile.write(data)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def hub(tiny_model):
    server = HubStandIn(REPO, tiny_model)
    yield server
    server.close()


@pytest.fixture(scope="module")
def emulator():
    with Emulator() as emu:
        emu.create_bucket("model-bkt")
        yield emu


@pytest.fixture
def cache(tmp_path, hub, emulator, monkeypatch) -> ModelCache:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub.downloads.clear()
    mc = ModelCache(
        local_dir=str(tmp_path / "models"),
        gcs_uri=f"gs://model-bkt/{tmp_path.name}/model-cache",
        hub_endpoint=hub.url,
    )
    session = GCSSession(
        make_client(endpoint=emulator.url), retry=retry_policy(initial=0.01, timeout=20)
    )
    mc._session = session
    return mc


def _entry(mc: ModelCache) -> Path:
    return Path(mc.local_dir) / REPO.replace("/", "--") / TAG


def _gcs_objects(mc: ModelCache) -> list[str]:
    d = mc.gcs_entry(REPO, TAG)
    return [b.name for b in d.session.client.list_blobs(d.bucket, prefix=d.prefix + "/")]


def test_the_hub_stand_in_serves_snapshot_download(hub, tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = snapshot_download(REPO, revision=TAG, local_dir=tmp_path / "snap", endpoint=hub.url)
    for name in ("config.json", "model.safetensors"):
        assert (Path(out) / name).read_bytes() == (tiny_model / name).read_bytes()


def test_tiers_in_order_hub_then_local_then_gcs(cache, hub, tiny_model):
    logs: list[str] = []
    first = cache.fetch(REPO, TAG, log=logs.append)
    assert first.tier == "hub" and first.seconds > 0
    assert "model.safetensors" in hub.downloads
    assert any("uploaded" in m for m in logs), logs
    names = _gcs_objects(cache)
    assert any(n.endswith("/manifest.json") for n in names)
    assert any(n.endswith("/model.safetensors") for n in names)
    assert (first.path / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors"
    ).read_bytes()

    hub.downloads.clear()
    second = cache.fetch(REPO, TAG)
    assert second.tier == "local" and second.path == first.path
    assert hub.downloads == []

    shutil.rmtree(_entry(cache))
    third = cache.fetch(REPO, TAG)
    assert third.tier == "gcs"
    assert hub.downloads == []
    assert safetensors_problem(third.path / "model.safetensors") is None
    assert cache.fetch(REPO, TAG).tier == "local"


def test_a_loaded_model_from_the_cache_works(cache):
    import torch
    from transformers import AutoModelForCausalLM

    path = cache.fetch(REPO, TAG).path
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 128)


def test_corrupt_local_entry_is_refetched_from_gcs(cache, hub):
    cache.fetch(REPO, TAG)
    weights = _entry(cache) / "model.safetensors"
    # Flip one byte inside the tensor data: same size, valid header; only sha256 sees it.
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    hub.downloads.clear()
    logs: list[str] = []
    again = cache.fetch(REPO, TAG, log=logs.append)
    assert again.tier == "gcs", again
    assert "sha256 mismatch" in again.skipped[0]
    assert hub.downloads == []
    assert weights.read_bytes() != bytes(data)


def test_truncated_local_entry_is_refetched(cache):
    cache.fetch(REPO, TAG)
    weights = _entry(cache) / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    again = cache.fetch(REPO, TAG)
    assert again.tier == "gcs"
    assert "wrong size" in again.skipped[0]


def test_a_partial_local_entry_without_marker_is_not_used(cache):
    cache.fetch(REPO, TAG)
    (_entry(cache) / MARKER).unlink()
    assert cache.fetch(REPO, TAG).tier == "gcs"


def _overwrite_weights_object(remote, snap) -> None:
    """Overwrite an object in place (a corrupting tool, bit rot): same name, new bytes."""
    blob = remote.session.client.bucket(remote.bucket).blob(
        f"{remote.prefix}/{snap.commit}/model.safetensors"
    )
    blob.upload_from_string(blob.download_as_bytes()[:100])


def _manifest_with_wrong_sha256(remote, snap) -> None:
    """The objects are intact but do not match the manifest's sha256 (e.g. a bad writer)."""
    blob = remote.session.client.bucket(remote.bucket).blob(remote.manifest_name)
    doc = json.loads(blob.download_as_bytes())
    for f in doc["files"]:
        if f["path"] == "config.json":
            f["sha256"] = "0" * 64
    blob.upload_from_string(json.dumps(doc), if_generation_match=snap.generation)


@pytest.mark.parametrize("corrupt", [_overwrite_weights_object, _manifest_with_wrong_sha256])
def test_corrupt_gcs_entry_is_refetched_from_the_hub_and_replaced(cache, hub, corrupt):
    cache.fetch(REPO, TAG)
    remote = cache.gcs_entry(REPO, TAG)
    corrupt(remote, remote.read())
    shutil.rmtree(_entry(cache))
    hub.downloads.clear()
    result = cache.fetch(REPO, TAG)
    assert result.tier == "hub", result
    assert result.skipped and result.skipped[0].startswith("gcs: corrupt"), result.skipped
    assert "model.safetensors" in hub.downloads
    # The GCS entry was replaced: a fresh machine now gets a good copy from GCS.
    shutil.rmtree(_entry(cache))
    hub.downloads.clear()
    assert cache.fetch(REPO, TAG).tier == "gcs"
    assert hub.downloads == []


def test_corrupt_header_in_gcs_is_caught_even_if_the_manifest_agrees(cache, hub, tmp_path):
    """A snapshot that was broken before it was cached (manifest matches) is not used."""
    cache.fetch(REPO, TAG)
    remote = cache.gcs_entry(REPO, TAG)
    src = tmp_path / "broken"
    shutil.copytree(_entry(cache), src)
    (src / MARKER).unlink()
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    remote.commit(src, asset=REPO, partition=TAG)
    shutil.rmtree(_entry(cache))
    result = cache.fetch(REPO, TAG)
    assert result.tier == "hub"
    assert "header is not JSON" in result.skipped[0]


def test_without_a_gcs_tier_the_hub_serves_and_local_caches(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    mc = ModelCache(local_dir=str(tmp_path / "m"), hub_endpoint=hub.url)
    assert mc.fetch(REPO, TAG).tier == "hub"
    assert mc.fetch(REPO, TAG).tier == "local"


def test_unknown_revision_fails_clearly(cache):
    with pytest.raises(ModelCacheError, match=r"lab-test/tiny-llama@v9\.9.*(?i:revision)"):
        cache.fetch(REPO, "v9.9")
    assert not _entry(cache).parent.joinpath("v9.9").exists()


def test_a_touched_but_intact_local_entry_is_rehashed_and_kept(cache):
    first = cache.fetch(REPO, TAG)
    weights = first.path / "model.safetensors"
    os.utime(weights)  # as after a copy that does not keep mtimes
    assert cache.fetch(REPO, TAG).tier == "local"
    stamp = json.loads((first.path / MARKER).read_text())["stamp_ns"]
    assert weights.stat().st_mtime_ns == stamp, "re-verified files get the stamp back"
