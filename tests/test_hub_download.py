"""Hub models: model.path -> local Hugging Face cache -> download, against a local server standing in for the hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and its timeouts when it is imported, so every
resolution runs in a child process with its own environment; the fake hub runs in a thread of this process and
records every request it serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

# Every test here starts Python processes against a local stand-in for the hub: end-to-end.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "org/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SENTENCES = ["The cat sits on the mat.", "Die Katze sitzt auf der Matte.", "Η γάτα κάθεται στο χαλί."]
# Files a real hub repository carries beside the ones loading needs; none of them may be requested.
DECOYS = {
    "onnx/model.onnx": b"onnx" * 64,
    "onnx/config.json": b"{}",
    "tf_model.h5": b"h5" * 64,
    "flax_model.msgpack": b"msgpack" * 16,
    "rust_model.ot": b"rust" * 16,
    "openvino/openvino_model.xml": b"<xml/>",
    "pytorch_model.bin": b"not-needed: the repository has safetensors",
}
HUB_ENV = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
           "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")

CHILD = r"""
import json, sys
import numpy as np
from hybrid_retrieval.models.encoder import load_encoder
from hybrid_retrieval.models.loading import ModelNotFoundError, resolve_hub_folder

action, checkpoint, out = sys.argv[1], sys.argv[2], sys.argv[3]
result = {}
try:
    if action == "encode":
        encoder = load_encoder(name="x", source="hub", checkpoint=checkpoint, pooling="mean")
        np.save(out + ".npy", encoder.encode(json.loads(sys.argv[4]), "passage"))
    result["folder"] = str(resolve_hub_folder("x", checkpoint, None))
except ModelNotFoundError as err:
    result["error"] = str(err)
with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f)
"""


class FakeHub:
    """Answers the calls snapshot_download makes: model info, tree listing, HEAD/GET of /resolve/ files."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()

    def resolved_files(self) -> set[str]:
        """Repository paths requested through /<repo>/resolve/<rev>/<file>."""
        return {path.split("/resolve/", 1)[1].split("/", 1)[1] for _, path in self.requests if "/resolve/" in path}

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            files = self.repos.get(repo)
            if files is None:
                return self.send(handler, 404, b'{"error":"Repository not found"}', body,
                                 {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})
            if not rest or rest[0] == "revision":  # /api/models/<repo>[/revision/<rev>]
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in sorted(files)]}
                return self.send_json(handler, info, body)
            if rest[0] == "tree":  # /api/models/<repo>/tree/<rev>[/<folder>]?recursive=...
                tree = [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for f, data in sorted(files.items())]
                return self.send_json(handler, tree, body)
        if len(parts) >= 5 and parts[2] == "resolve":  # /<repo>/resolve/<rev>/<file>
            files = self.repos.get("/".join(parts[:2]))
            filename = "/".join(parts[4:])
            if files is None:
                return self.send(handler, 404, b"Repository not found", body, {"X-Error-Code": "RepoNotFound"})
            if filename not in files:
                return self.send(handler, 404, b"Entry not found", body,
                                 {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            data = files[filename]
            return self.send(handler, 200, data, body, {
                "X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            })
        return self.send(handler, 404, b"not found", body, {})

    def send_json(self, handler: BaseHTTPRequestHandler, payload: object, body: bool) -> None:
        self.send(handler, 200, json.dumps(payload).encode(), body, {"Content-Type": "application/json"})

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, me5_small_dir: Path) -> Path:
    """A 2-layer random BERT on the e5 tokenizer, saved as a transformers folder (safetensors)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(str(me5_small_dir))
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture()
def hub(tiny_model_dir: Path) -> Iterator[FakeHub]:
    files = {p.relative_to(tiny_model_dir).as_posix(): p.read_bytes()
             for p in sorted(tiny_model_dir.rglob("*")) if p.is_file()}
    server = FakeHub({REPO_ID: {**files, **DECOYS, "README.md": b"# tiny model\n"}})
    try:
        yield server
    finally:
        server.stop()


def closed_port_endpoint() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)
    return env


def run_child(action: str, checkpoint: str, env: dict[str, str], out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, action, checkpoint, str(out), *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_hub_model_is_downloaded_once_then_read_from_the_cache(tmp_path: Path, hub: FakeHub,
                                                                 tiny_model_dir: Path) -> None:
    from hybrid_retrieval.models.encoder import load_encoder
    from hybrid_retrieval.models.loading import hub_files_to_fetch

    hf_home = tmp_path / "hf"
    env = hub_env(hub.endpoint, hf_home)
    first = run_child("encode", REPO_ID, env, tmp_path / "first.json", json.dumps(SENTENCES))
    assert "error" not in first, first
    folder = Path(first["folder"])
    assert folder.is_relative_to(hf_home / "hub") and folder.name == COMMIT

    # (a) the downloaded model embeds exactly as the same model loaded from its original folder
    reference = load_encoder(name="x", source="hub", path=str(tiny_model_dir), pooling="mean")
    np.testing.assert_allclose(np.load(tmp_path / "first.json.npy"), reference.encode(SENTENCES, "passage"),
                               atol=1e-6)

    # (b) only what loading needs was fetched: no decoy, no pytorch_model.bin next to safetensors, no README
    needed = set(hub_files_to_fetch(list(hub.repos[REPO_ID])))
    assert hub.resolved_files() == needed
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= needed
    assert not needed & (set(DECOYS) | {"README.md"})
    assert not any(name in path for _, path in hub.requests for name in [*DECOYS, "README.md"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(needed)

    # (c) a second resolution finds the cache: no request while the server runs, and none needed once it is gone
    served = len(hub.requests)
    again = run_child("resolve", REPO_ID, env, tmp_path / "again.json")
    assert again.get("folder") == str(folder) and len(hub.requests) == served
    hub.stop()
    stopped = run_child("resolve", REPO_ID, env, tmp_path / "stopped.json")
    assert stopped.get("folder") == str(folder), stopped
    offline = run_child("resolve", REPO_ID, {**env, "HF_HUB_OFFLINE": "1"}, tmp_path / "offline.json")
    assert offline.get("folder") == str(folder), offline


@pytest.mark.parametrize("case", ["unknown repo", "unreachable endpoint", "silent endpoint", "offline"])
def test_unavailable_hub_model_fails_fast_with_the_fix(tmp_path: Path, hub: FakeHub, case: str) -> None:
    checkpoint = "org/absent-model" if case == "unknown repo" else REPO_ID
    extra = {"HF_HUB_OFFLINE": "1"} if case == "offline" else {}
    with socket.socket() as silent:  # accepts connections (through the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = {"unreachable endpoint": closed_port_endpoint(),
                    "silent endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}"}.get(case, hub.endpoint)
        result = run_child("resolve", checkpoint, hub_env(endpoint, tmp_path / "hf", **extra), tmp_path / "out.json")
    message = result.get("error", "")
    assert checkpoint in message and "model.path=/local/copy" in message, result
    assert f"hf download {checkpoint}" in message and "HF_ENDPOINT" in message
    reason = {"unknown repo": "not found", "offline": "offline"}.get(case, "network error")
    assert reason in message
    assert not hub.resolved_files()  # nothing was downloaded
    if case == "offline":
        assert not hub.requests


@pytest.mark.parametrize("case", ["offline", "unreachable"])
def test_cli_without_the_model_fails_before_any_work(tmp_path: Path, data_root: Path, case: str) -> None:
    """``python run.py model=xlmr`` with an empty HF_HOME stops in the config check, offline or with no reachable hub."""
    if case == "offline":
        env = hub_env("https://huggingface.co", tmp_path / "empty-hf-home", HF_HUB_OFFLINE="1")
    else:
        env = hub_env(closed_port_endpoint(), tmp_path / "empty-hf-home")
    env.update(HYBRID_RETRIEVAL_DATA=str(data_root), HYBRID_RETRIEVAL_OFFLINE="1")
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    proc = subprocess.run([sys.executable, "run.py", "model=xlmr", f"logger.tracking_uri=sqlite:///{tmp_path}/m.db",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "model.path=/local/copy" in proc.stderr and "xlm-roberta-base" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "m.db").exists()
    assert not any((tmp_path / "empty-hf-home").rglob("*.safetensors"))
