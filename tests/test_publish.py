"""Publishing an exported folder (models/publish.py): every check before anything is sent, then one repository
creation and one folder upload. The hub is not reachable here; a recorder stands in for huggingface_hub's HfApi
at the network boundary (create_repo, upload_folder) and checks what would be uploaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hybrid_retrieval.models.model_folder import export_encoder
from hybrid_retrieval.models.publish import PublishError, check_publishable, push_folder


class HubRecorder:
    """create_repo and upload_folder as HfApi takes them; upload_folder lists the files it would send."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, **kwargs: Any) -> str:
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs: Any) -> Any:
        files = sorted(str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*")
                       if p.is_file())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def folder(tiny_encoder: Any, tmp_path: Path) -> Path:
    return Path(export_encoder(tiny_encoder, tmp_path / "my-model"))


def test_a_checked_folder_is_created_and_uploaded_in_one_commit(folder: Path) -> None:
    hub = HubRecorder()
    url = push_folder(folder, "someone/my-model", api=hub)
    assert url == "https://huggingface.co/someone/my-model/commit/abc"
    (create, args), (upload, sent) = hub.calls
    assert create == "create_repo" and args == {"repo_id": "someone/my-model", "repo_type": "model", "private": True,
                                                "exist_ok": True}
    assert upload == "upload_folder" and sent["folder_path"] == str(folder.resolve())
    assert {"README.md", "config.json", "modules.json", "model.safetensors", "config_sentence_transformers.json",
            "1_Pooling/config.json", "tokenizer.json"} <= set(sent["files"])


@pytest.mark.parametrize("repo", ["my-model", "a/b/c", "/abs", "someone/", ""])
def test_a_bad_repo_id_is_refused_before_anything_is_sent(folder: Path, repo: str) -> None:
    hub = HubRecorder()
    with pytest.raises(PublishError, match="expected <user or organisation>/<model name>"):
        push_folder(folder, repo, api=hub)
    assert hub.calls == []


def test_an_incomplete_folder_or_a_card_with_a_local_path_is_refused(folder: Path, tmp_path: Path) -> None:
    hub = HubRecorder()
    (folder / "modules.json").unlink()
    with pytest.raises(PublishError, match="missing modules.json"):
        push_folder(folder, "someone/my-model", api=hub)
    (folder / "modules.json").write_text("[]")
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card + f"\nTrained from {folder}\n")
    with pytest.raises(PublishError, match="names a local path"):
        check_publishable(folder, "someone/my-model")
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(PublishError, match="does not parse"):
        check_publishable(folder, "someone/my-model")
    assert hub.calls == []


def test_without_a_token_the_error_says_how_to_give_one(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match="HF_TOKEN or run `huggingface-cli login`"):
        push_folder(folder, "someone/my-model")
