"""--push_to_hub: upload a finished run's output folder to the Hugging Face hub, as diffusers' scripts do at the end.

Design: the upload is the last thing a run does, after every file is written and the loggers are closed, so a hub
that cannot be reached or a refused token costs nothing: the error says so and the files stay in the output folder.
A missing token is caught before the model loads (`check_token`).
"""

from __future__ import annotations

import logging
import os

from flax_lora.errors import UserError

logger = logging.getLogger("flax_lora.hub")
# The orbax checkpoints only resume this trainer; the adapter files are what a hub user loads.
IGNORE_PATTERNS = ["checkpoints/*"]


class HubUploadError(UserError):
    """The upload failed; every output is saved locally."""


def repo_name(hub_model_id: str | None, output_dir: str) -> str:
    """The repository to upload to: --hub_model_id, else the output folder's name (diffusers' default)."""
    return hub_model_id or os.path.basename(os.path.normpath(output_dir))


def check_token(token: str | None) -> None:
    """Refuse --push_to_hub without a token before any slow work (the upload would fail at the very end)."""
    from huggingface_hub import get_token

    if not token and not get_token():
        raise UserError("--push_to_hub needs a hub token: pass --hub_token, or log in once with `hf auth login`")


def _failure(e: Exception) -> str:
    """Why an upload failed, in a few words."""
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if status in (401, 403):
        return f"the hub refused the token ({status}): check --hub_token or `hf auth login`, and its write access"
    if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__ or "Timeout" in type(e).__name__:
        return f"the hub cannot be reached, no network? ({type(e).__name__})"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def push_to_hub(output_dir: str, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the model repository if needed and upload `output_dir` (without checkpoints); returns the repo's URL."""
    from huggingface_hub import HfApi

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry loop prints a line per attempt before it gives up
    try:
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id  # the full owner/name when only a name was given
        logger.info("uploading %s to the hub repository %s", output_dir, repo_id)
        api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, commit_message="End of training", ignore_patterns=IGNORE_PATTERNS
        )
    except Exception as e:  # network, auth, quota, naming: huggingface_hub raises many types
        raise HubUploadError(
            f"--push_to_hub: uploading to {repo_id} failed: {_failure(e)}. Every file is saved in {output_dir}; "
            f"upload it later with `hf upload {repo_id} {output_dir} --exclude 'checkpoints/*'`"
        ) from e
    finally:
        hub_logger.setLevel(level)
    return str(url) if isinstance(url, str) else f"https://huggingface.co/{repo_id}"  # a RepoUrl is a str
