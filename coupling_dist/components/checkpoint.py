"""Sharded, atomic, resumable training checkpoints (DeepSpeed shards + our per-rank trainer state).

Layout under ``<stage_dir>/checkpoints/``::

    step_00000100/                         a complete checkpoint
        mp_rank_00_model_states.pt          DeepSpeed: module (ZeRO 0-2), scheduler, client state
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   DeepSpeed: one optimizer shard per DP rank
        zero_pp_rank_{r}_mp_rank_00_model_states.pt   DeepSpeed, ZeRO-3 only: module shards
        trainer_state_rank{r}.pt / .json    ours: step, data position, RNG states, layout
        ema_rank{r}.pt                      ours: this rank's EMA shard (full tensors, by name)
        tp_layout.json                      ours: TP size, split dim + full shape per parameter
        complete.json                       written last, by rank 0, after every rank finished
    step_00000150.tmp/                      being written (or abandoned by a crash): never resumed
    .universal/step_00000100/               DeepSpeed universal conversion (made on demand)
    latest                                  name of the newest complete checkpoint, updated last

Save protocol: every rank writes into ``step_N.tmp``; the ranks exchange their write errors (a
collective that also acts as the barrier); each rank checksums its share of the files (size +
CRC32, cheap next to the write); rank 0 fsyncs, writes ``complete.json`` with every file's size and
CRC32, renames the directory to ``step_N``, replaces ``latest`` atomically, and prunes to the
newest ``keep_last``. A crash at any point leaves either the previous ``latest`` or a
``.tmp``/marker-less directory that resume skips. A failed write (a full disk: "no space left on
device", with the path) removes ``step_N.tmp`` and leaves ``latest`` on the previous checkpoint.

Resume (``plan_resume``) checks the chosen checkpoint's files against its ``complete.json`` before
DeepSpeed reads anything (every rank checks a share; a truncated, damaged or missing file is named
with its path). With ``train.resume=auto`` a broken checkpoint is skipped for the newest complete
earlier one (said in the log); a non-text or dangling ``latest`` likewise. When nothing complete is
left, or an explicit ``train.resume=PATH`` is broken, it fails (``CheckpointError``, exit status 2)
naming the path and the ``train.resume=`` to use.

Resume at another data-parallel size (or ZeRO stage), or at another tensor-parallel size (ZeRO
1/2, ``distributed.tp_reshape``: the TP slices are merged and re-cut as described by the
``universal_checkpoint_info`` saved in the DeepSpeed files; ``tp_layout.json`` checks the shapes
and re-cuts our EMA shards): rank 0 converts the sharded checkpoint with DeepSpeed's
``ds_to_universal`` (layout-independent, per-parameter fp32 weights and Adam moments) once, into
``.universal/`` (the source checkpoint is only read), and every rank loads it with
``checkpoint.load_universal``. RNG streams cannot map across world sizes: they are reseeded from
(seed, step, rank); the data stream continues exactly because the loader position is a global
step. Same world size: plain sharded load, bitwise exact. Our own files are read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import random
import re
import shutil
import time
import zlib
from typing import Optional

import numpy as np
import torch

from ..distributed.tp_reshape import TP_LAYOUT, check_shapes, read_layout, reshape_error, reshard_ema
from . import dist as D
from . import faults
from .atomic import fsync_tree, write_path, write_text
from .logging import get_logger
from .preflight import InputError, debug_enabled

LOG = get_logger("checkpoint")
MARKER, LATEST, UNIVERSAL = "complete.json", "latest", ".universal"
STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(InputError, ValueError):
    """A checkpoint cannot be resumed or written as asked (broken files, ``train.resume`` pointing
    nowhere, a layout it cannot be resumed at, a full disk): one line naming the path and what to
    do; exit status 2."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG a training step may draw from, in a form ``weights_only`` loading accepts."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": {"version": version, "state": list(state), "gauss": gauss},
           "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached": float(cached)},
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- finding checkpoints


def read_marker(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first; ``.tmp`` and marker-less dirs
    (interrupted writes) are ignored."""
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            marker = read_marker(path)
            if marker is not None and marker.get("step") == int(m.group(1)):
                out.append((int(m.group(1)), path))
    return sorted(out)


def read_latest(root: str) -> Optional[str]:
    """The complete checkpoint ``latest`` names, or None (absent, not text, or naming something that
    is not a complete checkpoint: said in the log)."""
    latest = os.path.join(root, LATEST)
    if not os.path.isfile(latest):
        return None
    try:
        with open(latest, "rb") as fh:
            name = fh.read(4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        LOG.warning("%s is not a readable text file (%s); using the newest complete checkpoint", latest, e)
        return None
    path = os.path.join(root, name)
    if STEP_RE.match(name) and read_marker(path) is not None:
        return path
    LOG.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest, name[:80])
    return None


def resume_candidates(root: str, resume: str = "auto", key: str = "train.resume") -> list[str]:
    """Checkpoints to try, best first. ``none``: none (fresh start). ``auto``: the one ``latest``
    names, then every other complete one, newest first. Otherwise ``[PATH]``, which must be a
    complete checkpoint (``CheckpointError`` naming it and the alternatives otherwise)."""
    if resume == "none":
        return []
    if resume != "auto":
        path = os.path.abspath(resume)
        if read_marker(path) is None:
            found = complete_checkpoints(root)
            alt = f"{key}={found[-1][1]} (the newest complete one), " if found else ""
            why = "does not exist" if not os.path.exists(path) else f"has no {MARKER} (interrupted while being written?)"
            raise CheckpointError(f"{key}: '{resume}' is not a complete checkpoint: {path} {why}; use {alt}"
                                  f"{key}=auto (the newest complete one under {root}, if any) or {key}=none "
                                  f"(start fresh)")
        return [path]
    first = read_latest(root)
    rest = [p for _, p in reversed(complete_checkpoints(root)) if p != first]
    return ([first] if first else []) + rest


def find_resume(root: str, resume: str = "auto") -> Optional[str]:
    """The first of ``resume_candidates`` (files not checked: ``CheckpointManager.plan_resume`` does)."""
    found = resume_candidates(root, resume)
    return found[0] if found else None


# --------------------------------------------------------------------------- file checksums


def file_record(path: str) -> dict:
    """{"bytes", "crc32"} of one file (CRC32 in 1 MiB blocks: ~GB/s, no second copy in memory)."""
    crc, n = 0, 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
            n += len(block)
    return {"bytes": n, "crc32": f"{crc & 0xFFFFFFFF:08x}"}


def list_files(ckpt: str) -> list[str]:
    """Every file of a checkpoint directory (relative paths, sorted), its marker excluded."""
    out = []
    for d, _, files in os.walk(ckpt):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), ckpt)
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def checksum_share(ckpt: str, names: list[str], rank: int, world: int) -> dict:
    """This rank's share (every ``world``-th file) of the checksum record."""
    return {n: file_record(os.path.join(ckpt, n)) for n in names[rank::world]}


def verify_share(ckpt: str, files: dict, rank: int, world: int) -> list[str]:
    """Problems (one line each, naming the file's path) in this rank's share of ``files``."""
    out = []
    for name in sorted(files)[rank::world]:
        want, path = files[name], os.path.join(ckpt, name)
        if not os.path.isfile(path):
            out.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != int(want["bytes"]):
            out.append(f"{path} is {size} bytes, {MARKER} says {want['bytes']} (truncated or replaced)")
            continue
        if file_record(path)["crc32"] != want["crc32"]:
            out.append(f"{path} has another CRC32 than {MARKER} records (damaged)")
    return out


def no_space(e: BaseException, root: str) -> bool:
    """Whether ``e`` (or what caused it) is a full disk. ``torch.save`` reports a failed write as a
    RuntimeError without the errno, so "write failed" counts when ``root``'s disk is (nearly) full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left on device" in text or "disk quota exceeded" in text:
            return True
        if "write failed" in text or "unexpected pos" in text:
            try:
                return shutil.disk_usage(root).free < 64 * 2**20
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------- files


def load_own(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    def __init__(self, stage_dir: str, keep_last: int = 2, resume_key: str = "train.resume"):
        self.root = os.path.join(stage_dir, "checkpoints")
        self.keep_last = keep_last
        self.resume_key = resume_key  # the config key named in messages (e.g. stage_b.train.resume)
        os.makedirs(self.root, exist_ok=True)

    def path(self, step: int) -> str:
        return os.path.join(self.root, step_name(step))

    # ------------------------------------------------------------------ save (collective)

    def save(self, engine, step: int, state: dict, ema_state: Optional[dict], layout: dict,
             tp_meta: Optional[dict] = None) -> str:
        """Write checkpoint ``step`` from every rank; returns its final path. ``state`` is this
        rank's trainer state (tensors, lists, numbers, strings only); ``tp_meta``
        (``tp_reshape.layout_meta``) makes the checkpoint loadable at another TP size."""
        final, name = self.path(step), step_name(step)
        tmp = final + ".tmp"
        if D.is_main() and os.path.exists(tmp):
            shutil.rmtree(tmp)  # abandoned by an earlier crash
        D.barrier()
        err = None
        r = D.rank()
        in_deepspeed = True
        try:
            engine.save_checkpoint(self.root, tag=name + ".tmp", save_latest=False)
            in_deepspeed = False
            faults.point("checkpoint.write", step=step, rank=r, path=os.path.join(tmp, f"trainer_state_rank{r}.pt"))
            write_path(os.path.join(tmp, f"trainer_state_rank{r}.pt"), lambda p: torch.save(state, p))
            summary = {k: v for k, v in state.items() if k in ("step", "data_step", "layout", "time")}
            write_text(os.path.join(tmp, f"trainer_state_rank{r}.json"), json.dumps(summary, indent=1))
            if ema_state is not None:
                write_path(os.path.join(tmp, f"ema_rank{r}.pt"), lambda p: torch.save(ema_state, p))
            if tp_meta is not None and D.is_main():
                write_text(os.path.join(tmp, TP_LAYOUT), json.dumps(tp_meta))
        except Exception as e:  # noqa: BLE001 -- every rank learns of it below, and all stop
            where = getattr(e, "filename", None) or tmp
            if no_space(e, self.root):
                err = f"no space left on device writing checkpoint {where} (rank {r})"
            else:
                err = f"rank {r} failed writing checkpoint {where} ({type(e).__name__}: {str(e).strip()[:300]})"
            if debug_enabled():
                LOG.exception(err)
            else:
                LOG.error(err)
            if in_deepspeed:
                # The other ranks finish DeepSpeed's save, which ends in a barrier: meet them there
                # (its writes are its last steps before it), or every rank waits for the timeout.
                try:
                    D.barrier()
                except Exception:  # noqa: BLE001 -- the exchange below reports what matters
                    pass
        errors = [x for x in D.all_gather_object(err) if x]
        if errors:
            self._abandon(tmp, errors)
        names = list_files(tmp)
        files: dict = {}
        for share in D.all_gather_object(checksum_share(tmp, names, r, D.world_size())):
            files.update(share)
        if D.is_main():
            fsync_tree(tmp)
            marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **layout, "files": files}
            write_text(os.path.join(tmp, MARKER), json.dumps(marker, indent=1))
            old = None
            if os.path.exists(final):  # same step written by an earlier run (resumed from further back)
                shutil.rmtree(os.path.join(self.root, UNIVERSAL, name), ignore_errors=True)  # its stale conversion
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            write_text(os.path.join(self.root, LATEST), name + "\n")
            self.prune()
        D.barrier()
        return final

    def _abandon(self, tmp: str, errors: list[str]) -> None:
        """A failed save (collective: every rank has ``errors``): rank 0 removes ``tmp``; all raise."""
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        prev = read_latest(self.root) if os.path.isfile(os.path.join(self.root, LATEST)) else None
        keep = f"{LATEST} still names {prev}" if prev else "no earlier checkpoint"
        first = errors[0]
        if first.startswith("no space left on device"):
            keep_key = self.resume_key.rsplit(".", 1)[0] + ".keep_last"
            raise CheckpointError(f"{first}; removed {tmp}; {keep}. Free space on {self.root} (or lower "
                                  f"{keep_key}) and relaunch the same command to resume")
        raise RuntimeError(f"{first}; removed {tmp}; {keep}" + (f" ({len(errors) - 1} more rank(s) failed)"
                                                                  if len(errors) > 1 else ""))

    def prune(self) -> None:
        done = complete_checkpoints(self.root)
        keep = {p for _, p in done[-self.keep_last:]}
        for _, path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(os.path.join(self.root, UNIVERSAL, os.path.basename(path)), ignore_errors=True)
        newest = done[-1][0] if done else -1
        for tmp in glob.glob(os.path.join(self.root, "step_*.tmp")):
            m = STEP_RE.match(os.path.basename(tmp)[:-4])
            if m and int(m.group(1)) < newest:  # stale leftovers of crashed saves
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ resume

    def plan_resume(self, resume: str, layout: dict) -> Optional[dict]:
        """Decided on rank 0 and broadcast, so every rank loads the same checkpoint (and every rank
        raises the same error). ``universal`` is set when the saved layout (DP size, ZeRO stage,
        MP size) differs from ``layout``; ``mp_changed`` when the TP size differs."""
        path = self.choose(resume)
        plan = None
        if D.is_main():
            try:
                if path is not None:
                    marker = read_marker(path)
                    mp_changed = marker.get("mp_world", 1) != layout["mp_world"]
                    why = reshape_error(path, marker, layout) if mp_changed else None
                    if why:
                        raise ValueError(why)
                    same = not mp_changed and all(marker.get(k) == layout[k]
                                                  for k in ("dp_world", "zero_stage", "world"))
                    plan = {"path": path, "step": int(marker["step"]), "marker": marker, "universal": not same,
                            "mp_changed": mp_changed}
            except (OSError, ValueError) as e:
                plan = {"error": str(e), "kind": type(e).__name__}
        plan = D.broadcast_object(plan)
        if plan is not None and "error" in plan:
            kind, msg = plan["kind"], plan["error"]
            raise CheckpointError(msg if kind in ("ValueError", "CheckpointError") else f"{kind}: {msg}")
        return plan

    def choose(self, resume: str) -> Optional[str]:
        """The checkpoint to resume (collective): the first candidate whose files match its record,
        every rank checking a share. ``auto`` skips broken ones (saying which file is wrong) for the
        newest complete earlier one; otherwise, or when none is left, ``CheckpointError``."""
        cands = None
        if D.is_main():
            try:
                cands = {"paths": resume_candidates(self.root, resume, self.resume_key)}
            except CheckpointError as e:
                cands = {"error": str(e)}
        cands = D.broadcast_object(cands)
        if "error" in cands:
            raise CheckpointError(cands["error"])
        key, broken = self.resume_key, []
        for path in cands["paths"]:
            marker = read_marker(path) or {}
            files = marker.get("files")
            mine = verify_share(path, files, D.rank(), D.world_size()) if files else []  # older: no record
            problems = [p for share in D.all_gather_object(mine) for p in share]
            if not problems:
                if broken and D.is_main():
                    LOG.warning("falling back to %s: the newer checkpoint(s) %s are broken", path,
                                ", ".join(b for b, _ in broken))
                return path
            more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
            broken.append((path, problems[0] + more))
            if D.is_main():
                LOG.warning("checkpoint %s is broken: %s%s; not resuming from it", path, problems[0], more)
        if not broken:
            return None
        path, why = broken[0]
        if resume != "auto":
            good = [p for _, p in reversed(complete_checkpoints(self.root)) if p != path]
            alt = f"{key}=auto (tries the newest intact one) or {key}=none (start fresh)" if good else f"{key}=none (start fresh)"
            raise CheckpointError(f"{key}={resume}: checkpoint {path} is broken: {why}; use {alt}")
        raise CheckpointError(f"checkpoint {path} is broken: {why}; no other checkpoint under {self.root} is "
                              f"intact. Start fresh with {key}=none (the broken checkpoint(s) are left in place)")

    def trainer_state(self, path: str) -> dict:
        """Rank 0's trainer state saved in checkpoint ``path`` (step, data position, task meta...)."""
        return load_own(os.path.join(path, "trainer_state_rank0.pt"))

    def universal_dir(self, plan: dict) -> str:
        return os.path.join(self.root, UNIVERSAL, os.path.basename(plan["path"]))

    def convert_universal(self, plan: dict) -> str:
        """DeepSpeed universal checkpoint of ``plan['path']`` (rank 0 converts once; cached)."""
        out = self.universal_dir(plan)
        cached = read_marker(out) if D.is_main() else None
        # the conversion belongs to one write of step N (a resumed run may rewrite step N)
        ok = True
        if D.is_main() and (cached is None or cached.get("source_time") != plan["marker"].get("time")):
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = out + ".tmp"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                LOG.info("converting %s (TP %s, DP %s, ZeRO %s) to a universal checkpoint for this layout",
                         plan["path"], plan["marker"].get("mp_world"), plan["marker"].get("dp_world"),
                         plan["marker"].get("zero_stage"))
                ds_to_universal(argparse.Namespace(input_folder=plan["path"], output_folder=tmp, num_extract_workers=1,
                                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                                   inject_missing_state=True))
                write_text(os.path.join(tmp, MARKER), json.dumps(
                    {"step": plan["step"], "universal": True, "source_time": plan["marker"].get("time")}))
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
            except Exception:
                LOG.exception("universal conversion of %s failed", plan["path"])
                ok = False
        if not D.all_ok(ok):  # the other ranks wait here: fail them too instead of hanging
            raise RuntimeError(f"DeepSpeed universal conversion of {plan['path']} failed (see rank 0's log); "
                               f"the checkpoint itself is unchanged")
        return out

    def load(self, engine, plan: dict, mp_rank: int = 0, mp_world: int = 1, tp_meta: Optional[dict] = None,
             ema_names: Optional[set] = None) -> tuple[Optional[dict], dict, list[dict]]:
        """Load DeepSpeed state into ``engine``; return (this rank's trainer state or None when the
        layout changed, rank 0's trainer state, EMA shards for this model-parallel rank). After a TP
        size change the EMA shards are re-cut for (``mp_rank``, ``mp_world``) (only ``ema_names``)."""
        ckpt = plan["path"]
        saved_tp = None
        if plan.get("mp_changed"):
            saved_tp = read_layout(ckpt)
            if tp_meta is None:
                raise ValueError(f"{ckpt}: saved at TP {plan['marker'].get('mp_world')}, but this run's task gives "
                                 f"no tp_partition_dims, so its TP {mp_world} slices cannot be cut; resume at the "
                                 f"saved TP")
            check_shapes(ckpt, saved_tp, tp_meta)
        if plan["universal"]:
            src = self.convert_universal(plan)
            load_dir, tag = os.path.dirname(src), os.path.basename(src)
        else:
            load_dir, tag = self.root, os.path.basename(plan["path"])
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
        own = None
        if not plan["universal"]:
            own = load_own(os.path.join(ckpt, f"trainer_state_rank{D.rank()}.pt"))
        first = load_own(os.path.join(ckpt, "trainer_state_rank0.pt"))
        files = sorted(glob.glob(os.path.join(ckpt, "ema_rank*.pt")))
        if saved_tp is not None:
            ema = reshard_ema(files, saved_tp, mp_rank, mp_world, ema_names, load_own) if files else []
            return own, first, ema
        ema = []
        for f in files:
            shard = load_own(f)
            if shard.get("mp_rank", 0) == mp_rank:
                ema.append(shard)
        return own, first, ema
