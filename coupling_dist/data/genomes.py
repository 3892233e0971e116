"""Real DNA for the DNA domain: fixed-length windows of bacterial genomes from the Debian package
``sibelia-examples`` (the example data of the Sibelia comparative-genomics tool).

The paper's Fly Brain enhancers (DeepFlyBrain_data.pkl) and their frozen classifier cannot be
fetched here; the Debian archive can. The package holds complete genomes of two Helicobacter
pylori strains (F32, Gambia94/24) and five Staphylococcus aureus strains (JH1, N315, TW20, MSSA476,
NCTC 8325) as gzipped FASTA, plus a draft assembly (contigs) of RN4220, a derivative of NCTC 8325.
We keep the records whose FASTA header says "complete genome" -- one label per genome -- and leave
the draft contigs out (a near-duplicate of NCTC 8325 in pieces).

The asset is materialised once into the cache (``components.paths.cache_dir()/sibelia-examples``):
``apt-get download sibelia-examples`` (no root needed: it only reads apt's package lists) and
``dpkg-deb -x``; the FASTA files and a manifest (package version, .deb sha256) are kept. A system
where the package is installed (``/usr/share/doc/sibelia/examples``) is used directly.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np

from ..components.atomic import write_dir
from ..components.paths import cache_dir
from ..components.preflight import PreflightError

PACKAGE = "sibelia-examples"
ASSET = "sibelia-examples"
SYSTEM_EXAMPLES = "/usr/share/doc/sibelia/examples"
_DEB_EXAMPLES = os.path.join("usr", "share", "doc", "sibelia", "examples")
ALPHABET = "ACGT"
_CODE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(ALPHABET):
    _CODE[ord(_c)] = _i


class GenomeAssetError(PreflightError):
    """The Debian genome asset could not be obtained or read (the CLI: one line, exit 2)."""


def _fetch_deb(out: str) -> None:
    """Download and unpack the package into ``out`` (FASTA files + manifest.json)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise GenomeAssetError(f"cannot fetch the DNA asset: '{tool}' not found (the Debian package "
                                   f"'{PACKAGE}' is fetched with apt-get download + dpkg-deb -x); install "
                                   f"'{PACKAGE}' on a Debian/Ubuntu machine and copy {SYSTEM_EXAMPLES} into "
                                   f"{os.path.join(cache_dir(), ASSET)}")
    with tempfile.TemporaryDirectory(dir=out) as work:
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=work, capture_output=True, text=True, timeout=600)
        debs = glob.glob(os.path.join(work, f"{PACKAGE}_*.deb"))
        if proc.returncode or len(debs) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .deb written"]
            raise GenomeAssetError(f"`apt-get download {PACKAGE}` failed (exit {proc.returncode}): {tail[0]} -- "
                                   f"the DNA windows need the Debian package '{PACKAGE}' (run `apt-get update` "
                                   f"first if apt has no package lists)")
        deb = debs[0]
        unpacked = os.path.join(work, "x")
        subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True, capture_output=True, timeout=600)
        src = os.path.join(unpacked, _DEB_EXAMPLES)
        _copy_fasta(src, out)
        with open(deb, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
        with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as fh:
            json.dump(dict(package=PACKAGE, deb=os.path.basename(deb), sha256=sha), fh, indent=2, sort_keys=True)
            fh.write("\n")


def _copy_fasta(src: str, out: str) -> None:
    files = sorted(glob.glob(os.path.join(src, "**", "*.fasta.gz"), recursive=True))
    if not files:
        raise GenomeAssetError(f"{src}: no *.fasta.gz files in the '{PACKAGE}' package")
    for f in files:
        dst = os.path.join(out, os.path.relpath(f, src))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(f, dst)


def genome_asset_dir() -> str:
    """The directory holding the package's ``*.fasta.gz`` files (fetched into the cache on first use)."""
    if glob.glob(os.path.join(SYSTEM_EXAMPLES, "**", "*.fasta.gz"), recursive=True):
        return SYSTEM_EXAMPLES
    return write_dir(os.path.join(cache_dir(), ASSET), _fetch_deb, replace=False)


def _genome_name(header: str) -> str:
    """'gi|...|ref|NC_017366.1| Helicobacter pylori F32, complete genome' -> 'Helicobacter pylori F32'."""
    name = header.rsplit("|", 1)[-1].strip()
    for tail in (", complete genome", " chromosome"):
        name = name.replace(tail, "")
    return name.strip()


def _read_fasta(path: str):
    """(header, sequence) of each record, sequence upper-cased."""
    header, parts = None, []
    with gzip.open(path, "rt", encoding="ascii") as fh:
        for line in fh:
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    yield header, "".join(parts).upper()
                header, parts = line[1:], []
            elif line:
                parts.append(line)
    if header is not None:
        yield header, "".join(parts).upper()


@functools.lru_cache(maxsize=2)
def load_genomes(asset_dir: Optional[str] = None) -> tuple[tuple[str, str], ...]:
    """((name, sequence), ...) of every complete genome, in sorted file then record order."""
    asset_dir = asset_dir or genome_asset_dir()
    out = []
    for f in sorted(glob.glob(os.path.join(asset_dir, "**", "*.fasta.gz"), recursive=True)):
        try:
            out.extend((_genome_name(h), s) for h, s in _read_fasta(f) if "complete genome" in h)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise GenomeAssetError(f"{f}: unreadable FASTA in the '{PACKAGE}' asset ({e}); delete "
                                   f"{os.path.join(cache_dir(), ASSET)} to fetch it again") from None
    if not out:
        raise GenomeAssetError(f"{asset_dir}: no complete-genome records in the '{PACKAGE}' FASTA files")
    return tuple(out)


def genome_species(label_names: list[str]) -> list[str]:
    """'Staphylococcus aureus subsp. aureus JH1' -> 'Staphylococcus aureus' (genus + species)."""
    return [" ".join(name.split()[:2]) for name in label_names]


def dna_ids(seq: str) -> np.ndarray:
    """One ACGT string -> uint8 ids (any length); ValueError naming the first other letter."""
    ids = _CODE[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]
    bad = np.flatnonzero(ids == 255)
    if len(bad):
        raise ValueError(f"has {seq[int(bad[0])]!r} at position {int(bad[0])}; only {ALPHABET} is allowed")
    return ids


def encode_dna(windows) -> np.ndarray:
    """Equal-length ACGT strings -> uint8 token ids [N, L] (A=0, C=1, G=2, T=3)."""
    windows = list(windows)
    lengths = {len(w) for w in windows}
    if len(lengths) > 1:
        raise ValueError(f"DNA sequences must have one length to be encoded together; got lengths {sorted(lengths)[:5]}")
    if not windows:
        return np.zeros((0, 0), dtype=np.uint8)
    ids = _CODE[np.frombuffer("".join(windows).encode("ascii", errors="replace"), dtype=np.uint8)]
    bad = np.flatnonzero(ids == 255)
    if len(bad):
        n, pos = divmod(int(bad[0]), len(windows[0]))
        raise ValueError(f"DNA sequence {n} has {windows[n][pos]!r} at position {pos}; only {ALPHABET} is allowed")
    return ids.reshape(len(windows), -1)


def decode_dna(tokens) -> list[str]:
    """Token ids [N, L] in 0..3 -> ACGT strings."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 3):
        raise ValueError(f"DNA token ids must lie in 0..3; got range [{arr.min()}, {arr.max()}]")
    table = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)
    return [table[row].tobytes().decode("ascii") for row in arr.astype(np.int64)]


def dna_windows(length: int = 500, stride: Optional[int] = None, max_windows: Optional[int] = None,
                seed: int = 0, asset_dir: Optional[str] = None) -> tuple[list[str], np.ndarray, list[str]]:
    """Windows of ``length`` bases every ``stride`` bases (default: ``length``, non-overlapping) along
    each complete genome; windows with a letter other than A/C/G/T are skipped.

    ``max_windows``: a uniform subset of that many, drawn with ``seed`` and kept in genome order.
    Returns (windows, labels int64 = the genome's index in ``label_names``, label_names). The same
    arguments give the same windows. Overlapping windows (stride < length) share bases, so a random
    train / held-out split of them leaks; split non-overlapping windows."""
    stride = stride or length
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be positive; got {length}, {stride}")
    genomes = load_genomes(asset_dir)
    windows, labels = [], []
    for label, (_, seq) in enumerate(genomes):
        for start in range(0, len(seq) - length + 1, stride):
            w = seq[start:start + length]
            if not w.strip(ALPHABET):
                windows.append(w)
                labels.append(label)
    labels = np.asarray(labels, dtype=np.int64)
    if max_windows is not None and max_windows < len(windows):
        keep = np.sort(np.random.default_rng(seed).choice(len(windows), size=max_windows, replace=False))
        windows, labels = [windows[i] for i in keep], labels[keep]
    return windows, labels, [name for name, _ in genomes]
