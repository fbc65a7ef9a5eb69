"""Publishing an exported model folder on the Hugging Face hub (``python -m hybrid_retrieval.export ...
push_to_hub=<user>/<name>``).

The folder is checked before anything is sent: it loads as a model (config, weights, tokenizer, the
sentence-transformers modules), its card parses with huggingface_hub and names no local path, and a token is
available. Then the repository is created (or reused) and the folder uploaded in one commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["PublishError", "check_publishable", "push_folder"]

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
REQUIRED = ("config.json", "modules.json", "README.md", "config_sentence_transformers.json")


class PublishError(ValueError):
    """A folder or repository id that cannot be published; the message says what to fix."""


def check_publishable(folder: str | os.PathLike[str], repo_id: str) -> Path:
    """The folder, checked: a valid repo id, the files a model needs, a card huggingface_hub parses, and no local
    path in it."""
    from huggingface_hub import ModelCard

    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise PublishError(f"push_to_hub={repo_id!r}: expected <user or organisation>/<model name>")
    path = Path(folder).expanduser().resolve()
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (the weights)")
    if missing:
        raise PublishError(f"{path} is not an exported model folder: missing {', '.join(missing)} (export it with "
                           "python -m hybrid_retrieval.export first)")
    card = (path / "README.md").read_text(encoding="utf-8")
    try:
        ModelCard(card).data.to_dict()
    except Exception as error:  # huggingface_hub raises several types for a malformed front matter
        raise PublishError(f"{path / 'README.md'}: the model card does not parse ({error})") from None
    local = [p for p in {str(path), str(Path.home()), os.getcwd()} if len(p) > 1 and p in card]
    if local:
        raise PublishError(f"{path / 'README.md'} names a local path ({local[0]}); remove it before publishing")
    return path


def push_folder(folder: str | os.PathLike[str], repo_id: str, private: bool = True,
                commit_message: str | None = None, api: Any = None) -> str:
    """Upload an exported folder to `repo_id` (created if missing, private by default); returns the commit URL.

    `api`: a ``huggingface_hub.HfApi`` (default: one with the token of ``HF_TOKEN`` or ``huggingface-cli login``).
    """
    path = check_publishable(folder, repo_id)
    if api is None:
        from huggingface_hub import HfApi, get_token

        if not get_token():
            raise PublishError("push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run "
                               "`huggingface-cli login`")
        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(path),
                               commit_message=commit_message or f"Upload {path.name} (hybrid_retrieval export)")
    return str(getattr(commit, "commit_url", commit))
