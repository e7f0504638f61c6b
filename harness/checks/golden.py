"""Saved reference captures ("golden runs"), like llama-perplexity's ``--kl-divergence-base``.

The float64 reference of a real checkpoint needs a big machine; the ports are checked on a small
one.  ``python -m harness capture`` runs only the reference and writes its captures here;
``parity --golden`` compares ports against them without loading the reference's weights.

A golden run is a folder: ``manifest.json`` plus ``captures-NNNNN-of-NNNNN.safetensors`` shards.
The manifest ties the captures to what produced them, so they are never compared with another
model: the canonical config.json and its hash, a fingerprint of the checkpoint (every tensor's
name, dtype, shape and a digest of three sampled 4 KiB blocks of its bytes, never a full read),
the prompt's tokens, the reference target (dtype, load mode, slope convention), the capture
points, the storage dtype, each shard's size and sha256, and the harness and library versions.

When the checkpoint has an MTP layer, ``capture`` also records the reference's side of the
``mtp`` check (:class:`harness.checks.mtp.RecordedReference`): its speculative run (steps,
chain, the trace of next tokens, drafts and acceptance in the manifest; the draft logits as
``mtp.draft_logits.NNNNN`` arrays), its plain greedy tokens and its teacher-forced ``mtp_*``
captures (``mtp.capture.<point>``), in the same shards.  A golden run without them (captured
before, or with ``--modes`` leaving ``mtp`` out) still serves prefill and decode; asked for the
``mtp`` check it is refused naming what is missing.

Storage is float64 by default: the float64 candidate tolerance (NMSE 1e-18) is below the error
a float32 store adds (about 1e-15, measured in tests/test_golden_store.py), so only float64
keeps every verdict and NMSE of a direct run; ``--store-dtype float32`` halves the size and is
refused for float64 candidates.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.targets import Target
from harness.checks.mtp import RecordedReference
from harness.core.atomic import staged_dir, write_text
from harness.core.cache import file_sha256
from harness.core.captures import Captures
from harness.core.errors import InputError

FORMAT = "bailing-parity-golden/1"
MANIFEST = "manifest.json"
STORE_DTYPES = ("float64", "float32")
SHARD_BYTES = 1 << 30  # captures per safetensors shard (a 64-token run of Ling-2.6-flash: ~1 GB)
SAMPLE_BLOCK = 4096  # bytes read from the start, middle and end of every tensor
FINGERPRINT_VERSION = "golden-v1"
LIST_LIMIT = 3
VERSIONED = ("numpy", "torch", "safetensors", "mlx", "mlx-lm", "llama_cpp_python", "gguf")


# --- identity of the checkpoint ------------------------------------------------------------
def config_digest(raw: Mapping[str, Any]) -> str:
    """sha256 of config.json's content (canonical JSON: key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def _sampled_digest(fh: Any, start: int, lo: int, hi: int) -> str:
    """16 hex digits of sha256 over a tensor's first, middle and last SAMPLE_BLOCK bytes."""
    h = hashlib.sha256()
    size = hi - lo
    for offset in sorted({0, max(0, size // 2 - SAMPLE_BLOCK // 2), max(0, size - SAMPLE_BLOCK)}):
        fh.seek(start + lo + offset)
        h.update(fh.read(min(SAMPLE_BLOCK, size - offset)))
    return h.hexdigest()[:16]


def checkpoint_fingerprint(checkpoint: Path) -> dict[str, Any]:
    """Every tensor -> [dtype, shape, sampled-bytes digest], and one digest over all of them.

    Reads the safetensors headers and 12 KiB per tensor (about 300 MB for a 24k-tensor
    checkpoint's worth of seeks, not its 208 GB)."""
    from harness.llamacpp.identity import _safetensors_header
    from references.checkpoint_io import IGNORED_SUFFIXES, weight_files

    where = weight_files(Path(checkpoint))
    by_file: dict[Path, list[str]] = {}
    for name in sorted(where):
        if not name.endswith(IGNORED_SUFFIXES):
            by_file.setdefault(where[name], []).append(name)
    tensors: dict[str, list[Any]] = {}
    for path, names in by_file.items():
        header, start = _safetensors_header(path)
        with path.open("rb") as fh:
            for name in names:
                meta = header[name]
                lo, hi = (int(x) for x in meta["data_offsets"])
                tensors[name] = [meta["dtype"], list(meta["shape"]),
                                 _sampled_digest(fh, start, lo, hi)]
    tensors = dict(sorted(tensors.items()))
    digest = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, tensors]).encode()).hexdigest()
    return {"version": FINGERPRINT_VERSION, "digest": digest, "tensors": tensors}


def _listed(items: Sequence[str]) -> str:
    more = f" (+{len(items) - LIST_LIMIT} more)" if len(items) > LIST_LIMIT else ""
    return "; ".join(items[:LIST_LIMIT]) + more


def fingerprint_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, tensor by tensor (empty when they match)."""
    if recorded.get("digest") == here.get("digest"):
        return []
    old, new = recorded.get("tensors", {}), here.get("tensors", {})
    out = [f"tensor {n} is missing here" for n in old if n not in new]
    out += [f"tensor {n} is not in the golden run" for n in new if n not in old]
    for n in (n for n in new if n in old and old[n] != new[n]):
        (d0, s0, _), (d1, s1, _) = old[n], new[n]
        if (d0, s0) != (d1, s1):
            out.append(f"tensor {n} is {d1} {s1} here, {d0} {s0} in the golden run")
        else:
            out.append(f"tensor {n} has other bytes")
    return out or [f"fingerprint {here.get('version')} differs from {recorded.get('version')}"]


_ABSENT = object()


def config_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Keys of config.json whose values differ (here vs recorded)."""
    keys = sorted(set(recorded) | set(here))
    return [f"{k}={here.get(k, '<absent>')!r} here, {recorded.get(k, '<absent>')!r} in the "
            "golden run" for k in keys if recorded.get(k, _ABSENT) != here.get(k, _ABSENT)]


# --- writing -------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """The harness's and the numeric libraries' versions (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("bailing-parity", *VERSIONED):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def target_json(target: Target) -> dict[str, Any]:
    return {"label": target.label, "backend": target.backend, "dtype": target.dtype,
            "extra": [list(kv) for kv in target.extra]}


def _stored(array: np.ndarray, store_dtype: str) -> np.ndarray:
    arr = np.ascontiguousarray(array)
    return arr.astype(store_dtype) if arr.dtype.kind in "fc" else arr


def _shards(captures: Captures, store_dtype: str) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in captures.items():
        arr = _stored(np.asarray(value), store_dtype)
        if shards[-1] and size + arr.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return shards


MTP_DRAFTS = "mtp.draft_logits."
MTP_CAPTURE = "mtp.capture."


def mtp_record(recorded: RecordedReference) -> tuple[dict[str, Any], Captures]:
    """The manifest's ``mtp`` section and the arrays it names, for a recorded MTP reference."""
    spec = recorded.spec
    arrays: Captures = {}
    trace = []
    for i, step in enumerate(spec.steps):
        name = None
        if step.drafts:
            name = f"{MTP_DRAFTS}{i:05d}"
            arrays[name] = np.asarray(step.draft_logits, dtype=np.float64)
        trace.append({"position": step.position, "next_token": step.next_token,
                      "drafts": list(step.drafts), "accepted": step.accepted,
                      "draft_logits": name})
    points = None
    if recorded.captures is not None:
        points = list(recorded.captures)
        arrays.update({f"{MTP_CAPTURE}{p}": np.asarray(v) for p, v in recorded.captures.items()})
    vocab = int(next(iter(arrays.values())).shape[-1]) if arrays else 0
    section = {"label": recorded.label, "steps": len(spec.tokens), "chain": spec.chain,
               "prompt": list(spec.prompt), "tokens": list(spec.tokens),
               "plain": list(recorded.plain), "trace": trace, "vocab": vocab,
               "captures": points}
    return section, arrays


def write_golden(out: Path, captures: Captures, manifest: Mapping[str, Any],
                 store_dtype: str = "float64", mtp: RecordedReference | None = None) -> Path:
    """Write the captures (and ``mtp``, the reference's side of the MTP check) and
    ``manifest`` (plus the shards' records) as one folder that appears complete under ``out``
    or not at all (harness.core.atomic.staged_dir)."""
    from safetensors.numpy import save_file

    if store_dtype not in STORE_DTYPES:
        raise InputError(f"--store-dtype {store_dtype!r}; expected one of "
                         f"{', '.join(STORE_DTYPES)}")
    section, arrays = mtp_record(mtp) if mtp is not None else (None, {})
    shards = _shards({**captures, **arrays}, store_dtype)
    with staged_dir(out) as tmp:
        files = []
        for i, shard in enumerate(shards):
            name = f"captures-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": FORMAT})
            files.append({"file": name, "size": (tmp / name).stat().st_size,
                          "sha256": file_sha256(tmp / name), "points": sorted(shard)})
        full = {"format": FORMAT, **manifest, "store_dtype": store_dtype,
                "capture_points": list(captures), "files": files}
        if section is not None:
            full["mtp"] = section
        write_text(tmp / MANIFEST, json.dumps(full, indent=1))
    return out


# --- reading -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldenRun:
    """A golden run's manifest, read and checked for shape; captures are read on demand."""

    path: Path
    manifest: dict[str, Any]

    @property
    def tokens(self) -> list[int]:
        return list(self.manifest["tokens"])

    @property
    def store_dtype(self) -> str:
        return str(self.manifest["store_dtype"])

    @property
    def reference(self) -> Target:
        ref = self.manifest["reference"]
        return Target(ref["backend"], ref["dtype"], tuple(tuple(kv) for kv in ref["extra"]))

    @property
    def slope_convention(self) -> dict[str, str] | None:
        return self.manifest.get("slope_convention")

    def check_checkpoint(self, checkpoint: Path, raw_config: Mapping[str, Any]) -> None:
        """InputError naming what differs when ``checkpoint`` is not the one captured."""
        check_recorded_checkpoint(self.path / MANIFEST, self.manifest, checkpoint, raw_config,
                                  "captured")

    def check_tokens(self, tokens: Sequence[int], source: str) -> None:
        """InputError when ``tokens`` (from ``source``) are not the golden run's prompt."""
        mine = self.tokens
        if list(tokens) == mine:
            return
        at = next((i for i, (a, b) in enumerate(zip(tokens, mine, strict=False)) if a != b),
                  min(len(tokens), len(mine)))
        raise InputError(f"{source}: tokens differ from the golden run's ({self.path / MANIFEST}):"
                         f" {len(tokens)} vs {len(mine)} tokens, first difference at position "
                         f"{at}; leave --prompt-tokens out to use the golden run's")

    def captures(self) -> Captures:
        """Every stored capture; a missing, truncated or altered shard is an InputError naming
        the file (its size and sha256 are checked against the manifest before it is parsed)."""
        return self._read(self.manifest["capture_points"], "capture points")

    @property
    def has_mtp(self) -> bool:
        return isinstance(self.manifest.get("mtp"), dict)

    def require_mtp(self) -> None:
        """InputError naming what is missing when the MTP check cannot be served."""
        if not self.has_mtp:
            raise InputError(
                f"{self.path / MANIFEST}: holds no MTP captures (the reference's speculative "
                "run, draft logits and mtp_* points), which --modes mtp needs; capture again "
                "with mtp in --modes (the default on a checkpoint with an MTP layer), or leave "
                "mtp out of --modes")

    def mtp(self) -> RecordedReference:
        """The reference's side of the MTP check (:meth:`require_mtp` first)."""
        from harness.checks.mtp_decoding import DraftStep, SpecResult

        self.require_mtp()
        sec = self.manifest["mtp"]
        where = f"{self.path / MANIFEST} (mtp)"
        try:
            names = [t["draft_logits"] for t in sec["trace"] if t["draft_logits"]]
            points = sec["captures"]
            arrays = self._read(names + [f"{MTP_CAPTURE}{p}" for p in points or ()],
                                "MTP arrays")
            steps = tuple(
                DraftStep(int(t["position"]), int(t["next_token"]),
                          tuple(int(d) for d in t["drafts"]), int(t["accepted"]),
                          arrays[t["draft_logits"]].astype(np.float64) if t["draft_logits"]
                          else np.zeros((0, int(sec["vocab"]))))
                for t in sec["trace"])
            spec = SpecResult(tuple(int(x) for x in sec["prompt"]),
                              tuple(int(x) for x in sec["tokens"]), steps, int(sec["chain"]))
            caps = (None if points is None else
                    {p: _widened(arrays[f"{MTP_CAPTURE}{p}"]) for p in points})
            plain = tuple(int(x) for x in sec["plain"])
            label = str(sec["label"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: malformed MTP record ({type(e).__name__}: {e})") from None
        return RecordedReference(label, spec, plain, caps, where)

    def _read(self, names: Sequence[str], what: str) -> Captures:
        """The stored arrays ``names``, each shard verified before it is parsed."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        wanted = set(names)
        out: Captures = {}
        for rec in self.manifest["files"]:
            if not wanted & set(rec.get("points", wanted)):
                continue
            path = self.path / rec["file"]
            if not path.is_file():
                raise InputError(f"{path}: golden capture file missing")
            size = path.stat().st_size
            if size != rec["size"]:
                raise InputError(f"{path}: golden capture file is {size} bytes, the manifest "
                                 f"records {rec['size']} (truncated or replaced)")
            if file_sha256(path) != rec["sha256"]:
                raise InputError(f"{path}: golden capture file has other bytes than the manifest "
                                 "records (corrupted)")
            try:
                shard = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as e:
                raise InputError(f"{path}: unreadable golden capture file ({e})") from None
            out.update((k, v) for k, v in shard.items() if k in wanted)
        missing = [p for p in names if p not in out]
        if missing:
            raise InputError(f"{self.path / MANIFEST}: {what} {_listed(missing)} are in "
                             "no capture file")
        return {p: out[p] for p in names}


def _widened(array: np.ndarray) -> np.ndarray:
    """A stored float array as float64 (what the reference's captures are)."""
    return array.astype(np.float64) if array.dtype.kind == "f" else array


REQUIRED_KEYS = ("tokens", "reference", "config_sha256", "fingerprint", "files",
                 "capture_points", "store_dtype")


def check_recorded_checkpoint(where: Path, manifest: Mapping[str, Any], checkpoint: Path,
                              raw_config: Mapping[str, Any], made: str) -> None:
    """InputError naming what differs when ``checkpoint`` is not the one a manifest (with
    ``config_sha256``, ``config`` and ``fingerprint``) recorded; ``made``: how the file came
    from it ("captured", "computed")."""
    if config_digest(raw_config) != manifest["config_sha256"]:
        diff = config_differences(manifest.get("config", {}), raw_config)
        raise InputError(f"{where}: {made} from another config than {checkpoint}/"
                         f"config.json: {_listed(diff or ['content differs'])}")
    diff = fingerprint_differences(manifest["fingerprint"], checkpoint_fingerprint(checkpoint))
    if diff:
        raise InputError(f"{where}: {made} from other weights than {checkpoint}: "
                         f"{_listed(diff)}")


def read_manifest(folder: Path, fmt: str, required: Sequence[str], *, kind: str,
                  option: str, writer: str) -> dict[str, Any]:
    """``folder``'s manifest.json, of format ``fmt`` with the ``required`` keys; InputError
    naming the file otherwise (``kind``: what it holds; ``option``/``writer``: what takes it
    and what writes it, for the message)."""
    where = Path(folder) / MANIFEST
    if not where.is_file():
        raise InputError(f"{where}: not found ({option} takes a folder written by "
                         f"`{writer}`)")
    try:
        manifest = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{where}: unreadable {kind} manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise InputError(f"{where}: not a {kind} manifest of format {fmt}")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise InputError(f"{where}: {kind} manifest lacks {', '.join(missing)}")
    return manifest


def open_golden(path: Path) -> GoldenRun:
    """The golden run in folder ``path``; InputError naming the file for anything unusable."""
    where = Path(path) / MANIFEST
    manifest = read_manifest(path, FORMAT, REQUIRED_KEYS, kind="golden", option="--golden",
                             writer="python -m harness capture")
    if manifest["store_dtype"] not in STORE_DTYPES:
        raise InputError(f"{where}: store_dtype {manifest['store_dtype']!r}; expected one of "
                         f"{', '.join(STORE_DTYPES)}")
    return GoldenRun(Path(path), manifest)


# --- one golden run per case and prompt (``capture --cases``, ``pytest cases --golden``) ----
def case_golden_path(root: Path, case: str, prompt: str) -> Path:
    """Where ``capture --cases ... --out ROOT`` puts a case prompt's golden run."""
    return Path(root) / case / prompt


def open_case_golden(root: Path, case: str, prompt: str, checkpoint: Path,
                     tokens: Sequence[int], reference: Target) -> GoldenRun:
    """The golden run of one case prompt under ``root``, checked against the case's checkpoint
    (config and weights), prompt and reference; InputError naming what is missing or differs
    (never a fallback to the live reference)."""
    from references.config import read_config_json

    path = case_golden_path(root, case, prompt)
    if not (path / MANIFEST).is_file():
        raise InputError(f"{path / MANIFEST}: not found: --golden {root} holds no golden run of "
                         f"case {case} prompt {prompt} (write them with `python -m harness "
                         f"capture --cases {case} --out DIR`)")
    golden = open_golden(path)
    golden.check_checkpoint(Path(checkpoint), read_config_json(Path(checkpoint) / "config.json"))
    golden.check_tokens(tokens, f"case {case} prompt {prompt}")
    if _unloaded(golden.reference) != _unloaded(reference):
        raise InputError(f"{path / MANIFEST}: captured with the reference "
                         f"{golden.reference.label}, this run's is {reference.label}")
    return golden


def _unloaded(target: Target) -> Target:
    """``target`` without its weight-loading mode (streamed and in-memory agree exactly)."""
    return Target(target.backend, target.dtype, tuple(kv for kv in target.extra
                                                      if kv[0] != "load"))


def check_candidates(golden: GoldenRun, candidates: Sequence[Target]) -> None:
    """A float32 store cannot judge a float64 candidate (its rounding exceeds the tolerance)."""
    if golden.store_dtype == "float64":
        return
    wide = [c.label for c in candidates if c.dtype == "float64"]
    if wide:
        raise InputError(f"{golden.path}: stored in {golden.store_dtype}, too coarse for the "
                         f"float64 candidate(s) {', '.join(wide)} (NMSE tolerance 1e-18)")
