"""The one pre-flight pattern: checks before any work raise ``PreflightError``; the CLI turns it
into one ``error: ...`` line and exit status 2 (``coupling_dist.cli``), and the Ray rank wrapper
into rank status 2. Messages name the file or key and say what to do.

``InputError`` is the wider family: anything wrong with what the user handed us (a corpus line, a
shard, a checkpoint, an export, a samples file), whenever it is found -- before any work or in the
middle of it. It is handled exactly like a pre-flight failure (one line, exit status 2, the
traceback only with ``--debug`` / ``COUPLING_DIST_DEBUG=1``). ``check_export`` is the shared check
of an exported model directory (``config.json`` + a complete ``model.safetensors``)."""
from __future__ import annotations

import os
import shutil
import tempfile

MIN_FREE_BYTES = int(float(os.environ.get("COUPLING_DIST_MIN_FREE_MB", "200")) * 2**20)


DEBUG_ENV = "COUPLING_DIST_DEBUG"  # "1": error exits print the traceback too (``--debug`` sets it)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class InputError(RuntimeError):
    """The user's inputs cannot be used (a file, line, key, shard, sample or checkpoint): the message
    names it and the fix; the CLI prints it as one line and exits with status 2."""


class PreflightError(InputError):
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


def safetensors_problem(path: str) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when it is): the 8-byte header length,
    the JSON header, and the data size it promises must all be there (a cut file fails here, cheaply,
    before any loader reads it)."""
    import json
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"only {size} bytes (truncated: no header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{size} bytes, but its header alone needs {n + 8} (truncated)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not a safetensors file ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return "not a safetensors file (header is not a JSON object)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if size != 8 + n + end:
        return f"{size} bytes, but its header describes {8 + n + end} (truncated or damaged)"
    return None


def check_export(path: str, what: str, fix: str, weights: str = "model.safetensors") -> None:
    """An export directory (``config.json`` + ``weights``) is present and complete, else
    ``InputError`` naming the file and ``fix`` (e.g. "run `python -m coupling_dist.stage_b`")."""
    import json

    conf = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InputError(f"{what} not found: {path} does not exist; {fix}")
    if not os.path.isfile(conf):
        raise InputError(f"{what} incomplete: {conf} is missing; {fix}")
    try:
        with open(conf, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{what} damaged: {conf} is not readable JSON ({e}); {fix}") from None
    wpath = os.path.join(path, weights)
    if not os.path.isfile(wpath):
        raise InputError(f"{what} incomplete: {wpath} is missing; {fix}")
    why = safetensors_problem(wpath)
    if why:
        raise InputError(f"{what} damaged: {wpath} is {why}; {fix}")


def require_labels(fields: dict, manifest: str, num_classes: int) -> None:
    """A class-conditional run (``data.num_classes`` > 0) reads every sample's class from the shard
    field ``label``: the shard set at ``manifest`` must hold it."""
    if num_classes and "label" not in (fields or {}):
        raise PreflightError(f"data.num_classes = {num_classes} makes the run class-conditional, but {manifest} has no "
                             f"'label' field (fields {sorted(fields or {})}); use a labelled domain/corpus "
                             f"(binary_image, dna, a text label column) or set data.num_classes=0")
