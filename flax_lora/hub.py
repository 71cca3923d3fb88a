"""--push_to_hub: upload a run's adapter at each checkpoint and its output folder at the end to the Hugging Face hub.

Design: the final upload is the last thing a run does, after every file is written and the loggers are closed, so a
hub that cannot be reached or a refused token costs nothing: the error says so and the files stay in the output
folder. A missing token is caught before the model loads (`check_token`). At each checkpoint the adapter files of
that step go to the repository's `checkpoint-N/` folder from a background thread (`CheckpointUploader`), so training
does not wait on the network; a failed checkpoint upload is a warning, since the final upload carries everything.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import tempfile

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


def _upload(folder: str, repo_id: str, token: str | None, private: bool, message: str, path_in_repo: str | None = None):
    """Create the model repository if needed and upload `folder` (without checkpoints); returns (repo id, URL)."""
    from huggingface_hub import HfApi

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry loop prints a line per attempt before it gives up
    try:
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id  # the full owner/name when only a name was given
        extra = {} if path_in_repo is None else {"path_in_repo": path_in_repo}
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=message, ignore_patterns=IGNORE_PATTERNS, **extra
        )
    finally:
        hub_logger.setLevel(level)
    return repo_id, str(url) if isinstance(url, str) else f"https://huggingface.co/{repo_id}"  # a RepoUrl is a str


def push_to_hub(output_dir: str, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the model repository if needed and upload `output_dir` (without checkpoints); returns the repo's URL."""
    logger.info("uploading %s to the hub repository %s", output_dir, repo_id)
    try:
        return _upload(output_dir, repo_id, token, private, "End of training")[1]
    except Exception as e:  # network, auth, quota, naming: huggingface_hub raises many types
        raise HubUploadError(
            f"--push_to_hub: uploading to {repo_id} failed: {_failure(e)}. Every file is saved in {output_dir}; "
            f"upload it later with `hf upload {repo_id} {output_dir} --exclude 'checkpoints/*'`"
        ) from e


class CheckpointUploader:
    """Uploads each checkpoint's adapter files to `checkpoint-N/` of the hub repository, one at a time, in a thread."""

    def __init__(self, repo_id: str, token: str | None = None, private: bool = False):
        self.repo_id, self.token, self.private = repo_id, token, private
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hub-upload")
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, step: int, write_files) -> None:
        """Write this step's files with `write_files(folder)` now, then upload them in the background."""
        folder = tempfile.mkdtemp(prefix=f"flax-lora-checkpoint-{step}-")
        write_files(folder)
        self._pending.append(self._pool.submit(self._upload, step, folder))

    def _upload(self, step: int, folder: str) -> bool:
        try:
            _upload(folder, self.repo_id, self.token, self.private, f"Checkpoint {step}", f"checkpoint-{step}")
            logger.info("uploaded the step-%d adapter to %s/checkpoint-%d", step, self.repo_id, step)
            return True
        except Exception as e:  # the run goes on: the final upload carries every file
            logger.warning("--push_to_hub: uploading checkpoint %d to %s failed (%s); training goes on", step,
                           self.repo_id, _failure(e))
            return False
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def wait(self) -> list[bool]:
        """Finish the uploads under way; whether each succeeded, in order."""
        done = [f.result() for f in self._pending]
        self._pending.clear()
        self._pool.shutdown(wait=True)
        return done
