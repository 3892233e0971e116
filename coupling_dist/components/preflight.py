"""The one pre-flight pattern: checks before any work raise ``PreflightError``; the CLI turns it
into one ``error: ...`` line and exit status 2 (``coupling_dist.cli``), and the Ray rank wrapper
into rank status 2. Messages name the file or key and say what to do."""
from __future__ import annotations

import os
import shutil
import tempfile

MIN_FREE_BYTES = int(float(os.environ.get("COUPLING_DIST_MIN_FREE_MB", "200")) * 2**20)


class PreflightError(RuntimeError):
    """The inputs or the environment do not fit the config (raised before any work)."""


def require_file(path: str, hint: str) -> None:
    if not os.path.isfile(path):
        raise PreflightError(f"{path} not found: {hint}")


def check_writable(path: str, what: str = "run.dir") -> None:
    """Fail at start, not after an hour: the output dir must be creatable, writable, with free space."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.write(fd, b"x" * 4096)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PreflightError(f"{what} '{path}' is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise PreflightError(f"{what} '{path}' has only {free / 2**20:.0f} MiB free "
                             f"(need at least {MIN_FREE_BYTES / 2**20:.0f} MiB; COUPLING_DIST_MIN_FREE_MB)")


def teacher_path(ref: str) -> str:
    """The resolved path of ``stage_b.kd.teacher`` (a HF causal LM directory, a .gguf file, or a
    loadable hub id)."""
    from . import assets

    path = assets.resolve(ref)
    if assets.gguf_split(path):  # one file: weights, config and tokenizer (e.g. asset:smollm2-135m-gguf)
        return path
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise PreflightError(f"stage_b.kd.teacher: '{path}' has no config.json (not a HF model directory "
                                 f"or a .gguf file)")
        return path
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_like_path:
        raise PreflightError(f"stage_b.kd.teacher: '{ref}' does not exist (expected a HF causal LM directory, "
                                   f"a .gguf file, a hub id, or a tiny:/asset: reference)")
    try:
        assets.load_config(path)
    except Exception as e:  # offline hub ids fail here, before any training
        raise PreflightError(f"stage_b.kd.teacher: '{ref}' is neither a directory nor a loadable hub id ({e})") from None
    return path
