"""Publishing a model directory on the Hugging Face hub.

``push_model`` publishes a model directory (card included) through ``HfApi.create_repo`` and
``upload_folder``. Offline (``HF_HUB_OFFLINE`` set, or the hub's endpoint, ``HF_ENDPOINT`` when set, not
answering an HTTP request within a few seconds), it fails at once with one line saying what to do.

Publishing sits above the model: it writes the card (:mod:`tipcap.card`), and the model never imports it.
Reading models by hub name is :mod:`tipcap.hub_cache`, below the model.
"""

from __future__ import annotations

from pathlib import Path

from tipcap import __version__
from tipcap.errors import TipcapError
from tipcap.hub_cache import first_line, is_hub_name
from tipcap.network import hub_unavailable


def push_model(
    directory: str | Path,
    repo: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Publish a model directory as the hub model ``repo`` (created when missing); return the commit's URL.

    A folder without a card (saved by ``TIPCap.save_pretrained`` alone, or before cards existed) gets one
    first.

    Raises:
        TipcapError: for a folder that is no tipcap model, a malformed repo name, no network (at once), no
            token, or a refusal by the hub.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise TipcapError(
            f"--model {directory}: not a tipcap model directory (needs config.json and model.safetensors)."
        )
    if "@" in repo or not is_hub_name(repo):
        raise TipcapError(f"--repo {repo!r}: expected a hub model name, owner/name.")
    reason = hub_unavailable()
    if reason is not None:
        raise TipcapError(
            f"cannot push {directory} to {repo}: {reason}; push from a machine that reaches the hub "
            "(without HF_HUB_OFFLINE), logged in with `hf auth login` or with --token."
        )
    # torch, needed only once the hub can be used
    from tipcap.card import write_model_card
    from tipcap.model_folder import CARD_NAME

    if not (directory / CARD_NAME).is_file():
        write_model_card(directory)
    api = HfApi(token=token, library_name="tipcap", library_version=__version__)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo,
            folder_path=directory,
            commit_message=commit_message or f"Upload {directory.name} with tipcap {__version__}",
            ignore_patterns=["*.tmp"],
        )
    except LocalTokenNotFoundError:
        raise TipcapError(
            f"cannot push to {repo}: no Hugging Face token; log in with `hf auth login`, set HF_TOKEN, or "
            "pass --token."
        ) from None
    except (HfHubHTTPError, HFValidationError) as e:
        raise TipcapError(f"pushing {directory} to {repo} failed: {first_line(e)}") from None
    return commit.commit_url
