"""Repository ids (``facebook/musicgen-small``) resolved offline through the local Hugging Face cache.

The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when the id is
resolved (not when a library was imported). Nothing is ever downloaded: an id that is not in the cache is an
error that says how to download it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name, or a bare name (old ids such as "t5-base"); letters, digits, '-', '_', '.'
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hub_cache_dir() -> Path:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith((".bin", ".safetensors", ".json"))


def resolve_repo_id(repo_id: str, revision: str | None = None) -> Path:
    """The folder of ``repo_id``'s cached snapshot (``revision``: a branch, tag or commit; default main)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:
        raise ValueError(f"{repo_id}: resolving a repository id needs the huggingface_hub package "
                         "(pip install huggingface_hub), or give the model's folder") from error
    cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError as error:
        raise ValueError(f"{repo_id}: not in the local Hugging Face cache ({cache}); nothing is downloaded at run "
                         f"time: fetch it once with `hf download {repo_id}` (pip install huggingface_hub), or give "
                         "the model's folder") from error
    except Exception as error:  # an id the hub library refuses, an unreadable cache entry
        raise ValueError(f"{repo_id}: cannot be resolved in the local Hugging Face cache {cache} ({error})") from error
    return Path(folder)
