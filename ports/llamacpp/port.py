"""Our llama.cpp port of Ling-2.6 (arch ``bailing_hybrid``) as a patch series, plus its tooling.

- :func:`patches`: the ordered patch files, for ``build.ensure_wheel(patches=patches())``.
- :data:`NAMES` / :data:`MTP_NAMES`: llama.cpp eval-callback names -> canonical capture points.
- :func:`converter_tree`: the Python side (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py``)
  of the vendored llama.cpp with the patches applied, cached per patch series.
- :func:`stage_checkpoint` / :func:`convert`: turn an HF-layout checkpoint into a GGUF with the
  patched converter; a checkpoint without a tokenizer gets a tiny byte-level BPE one staged.
- :func:`init_work_tree`: a git work tree of the pristine vendored llama.cpp to develop the port
  in (``export_patches.sh`` turns it back into the patch series).

Building or converting needs the sdist (``harness.llamacpp.build.sdist_tree``); nothing here
imports ``llama_cpp``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.core import cache
from harness.core.atomic import locked, staged_dir
from harness.llamacpp import build
from harness.llamacpp.identity import checkpoint_identity
from harness.llamacpp.names import PortNames
from references.tokenizer import byte_alphabet, is_tiny_tokenizer

PATCH_DIR = Path(__file__).resolve().parent / "patches"
ARCH = "bailing_hybrid"
PORT_NAME = "ours-bailing_hybrid"

# The MTP head runs in its own LLAMA_CONTEXT_TYPE_MTP context; {L} is the MTP block index
# (= num_hidden_layers).  Router internals keep build_moe_ffn's "<name>-{L}" names.
MTP_NAMES: dict[str, tuple[str, ...]] = {
    "mtp_enorm": ("mtp_enorm",),
    "mtp_hnorm": ("mtp_hnorm",),
    "mtp_eh_proj": ("mtp_eh_proj",),
    "mtp_attn_out": ("mtp_attn_out",),
    "mtp_ffn_inp": ("mtp_ffn_inp",),
    "mtp_ffn_moe_topk": ("ffn_moe_topk-{L}",),
    "mtp_ffn_moe_weights": (
        "ffn_moe_weights_scaled-{L}",
        "ffn_moe_weights_norm-{L}",
        "ffn_moe_weights-{L}",
    ),
    "mtp_ffn_out": ("mtp_ffn_out",),
    "mtp_l_out": ("mtp_l_out",),
    "mtp_result_norm": ("mtp_result_norm",),
    "mtp_result_output": ("result_output",),
}

# Every canonical per-layer point is named by the patched graph (src/models/bailing-hybrid.cpp);
# kv_cmpr exists on MLA layers only, gla_out / g_gate on GLA layers only, the ffn_moe_* points and
# ffn_shexp on MoE layers only.
NAMES = PortNames(
    arch=ARCH,
    layer={
        "attn_norm": ("attn_norm",),
        "kv_cmpr": ("kv_cmpr",),
        "gla_out": ("gla_out",),
        "g_gate": ("g_gate",),
        "attn_out": ("attn_out",),
        "ffn_inp": ("ffn_inp",),
        "ffn_norm": ("ffn_norm",),
        "ffn_moe_logits": ("ffn_moe_logits",),
        "ffn_moe_topk": ("ffn_moe_topk",),
        "ffn_moe_weights": (
            "ffn_moe_weights_scaled",
            "ffn_moe_weights_norm",
            "ffn_moe_weights",
        ),
        "ffn_shexp": ("ffn_shexp",),
        "ffn_out": ("ffn_out",),
        "l_out": ("l_out",),
    },
    note="our Ling-2.6 port (ports/llamacpp/patches) on llama.cpp 0c1e57098",
    mtp=MTP_NAMES,
)

# What converter_tree copies out of the vendored tree (the C++ sources are not needed to convert).
_PY_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
_STAGED_MARK = "bailing_parity_staged_tokenizer"


def patches() -> list[Path]:
    """The patch series, in application order (``git apply`` onto vendor/llama.cpp)."""
    found = sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if not found:
        raise FileNotFoundError(f"no patches in {PATCH_DIR}")
    return found


def series_key(series: list[Path] | None = None) -> str:
    """A short hash of the patch bytes (the cache key of everything derived from them)."""
    h = hashlib.sha256()
    for p in series if series is not None else patches():
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()[:16]


def _git_env(root: Path) -> dict[str, str]:
    return dict(os.environ, GIT_CEILING_DIRECTORIES=str(root.resolve().parent))


def init_work_tree(dest: Path | None = None, version: str = build.DEFAULT_VERSION) -> Path:
    """A git repo holding the pristine vendored llama.cpp as its only commit (for development)."""
    dest = Path(dest or cache.root() / "port-work" / "llama.cpp")
    if (dest / ".git").is_dir():
        return dest
    src = build.sdist_tree(version) / "vendor" / "llama.cpp"
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    env = _git_env(dest)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=port",
            "-c",
            "user.email=port@localhost",
            "commit",
            "-qm",
            f"llama.cpp vendored by llama-cpp-python {version}",
        ],
    ):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest


def converter_tree(series: list[Path] | None = None, version: str = build.DEFAULT_VERSION) -> Path:
    """The vendored converter + gguf-py with the patches applied (cached per patch series)."""
    series = patches() if series is None else list(series)
    root = build.cache_root() / "port-convert" / f"{version}-{series_key(series)}"
    if (root / ".complete").is_file():
        return root
    with locked(root.with_name(f".{root.name}.lock")):
        if (root / ".complete").is_file():  # another process built it while we waited
            return root
        return _build_converter_tree(root, series, version)


def _build_converter_tree(root: Path, series: list[Path], version: str) -> Path:
    src = build.sdist_tree(version) / "vendor" / "llama.cpp"
    with staged_dir(root, replace=True) as tmp:
        for part in _PY_PARTS:
            s = src / part
            (shutil.copytree if s.is_dir() else shutil.copy2)(s, tmp / part)
        includes = [
            f"--include={p}" if p.endswith(".py") else f"--include={p}/*" for p in _PY_PARTS
        ]
        for p in series:
            proc = subprocess.run(
                ["git", "apply", "--whitespace=nowarn", *includes, str(Path(p).resolve())],
                cwd=tmp,
                env=_git_env(tmp),
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise build.BuildError(f"applying {p} to the converter tree failed:\n{proc.stderr}")
        (tmp / ".complete").write_text("\n".join(str(p) for p in series))
    return root


def write_tiny_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with ids < vocab_size (synthetic checkpoints ship none).

    Byte tokens first (id = byte value), then a few merges, so that llama.cpp's BPE loader finds
    merges and a newline token; ids the tokenizer lacks are padded by the converter.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 256:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= 256, got {vocab_size}")
    n_merges = 8
    alphabet = byte_alphabet()
    n_bytes = min(256, vocab_size - n_merges)
    vocab = {alphabet[b]: b for b in range(n_bytes)}
    pairs = [
        ("a", "b"),
        ("c", "d"),
        ("e", "f"),
        ("g", "h"),
        ("i", "j"),
        ("k", "l"),
        ("m", "n"),
        ("o", "p"),
    ]
    merges = []
    for a, b in pairs[:n_merges]:
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20})
    )


def stage_checkpoint(checkpoint: Path, dest: Path) -> Path:
    """``dest``: the checkpoint's files symlinked, plus a tiny tokenizer when it has none."""
    checkpoint = Path(checkpoint).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        link = dest / f.name
        if not link.exists():
            link.symlink_to(f)
    has_tokenizer = any((checkpoint / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    if not has_tokenizer:
        cfg = json.loads((checkpoint / "config.json").read_text())
        write_tiny_tokenizer(dest, int(cfg["vocab_size"]))
        (dest / _STAGED_MARK).write_text("tokenizer written by ports.llamacpp.port\n")
    elif is_tiny_tokenizer(checkpoint):  # a synthetic case ships the harness's tiny tokenizer
        (dest / _STAGED_MARK).write_text("the checkpoint's tokenizer is the harness's tiny one\n")
    return dest


# Runs inside a fresh interpreter: the patched tree first on sys.path, then the converter's main.
# A staged tiny tokenizer (or the harness's own, which synthetic checkpoints ship) has no known
# pre-tokenizer hash, so "default" is named for it (only when the staging marker is present: a
# real checkpoint goes through the converter unchanged).
_DRIVER = r"""
import sys
from pathlib import Path
tree, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
if (model_dir / "@MARK@").exists():
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
""".replace("@MARK@", _STAGED_MARK)


def convert(
    checkpoint: Path,
    out: Path,
    outtype: str = "f32",
    *,
    series: list[Path] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 1800,
) -> Path:
    """Convert an HF-layout Ling-2.6 checkpoint to ``out`` with the patched converter."""
    tree = converter_tree(series)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bailing-stage-") as tmp:
        staged = stage_checkpoint(Path(checkpoint), Path(tmp) / "model")
        # One .part per process: two xdist workers converting the same checkpoint must not
        # rename each other's file away (seen in CI as "failed (0)" with no output file).
        part = out.with_name(f"{out.name}.{os.getpid()}.part")
        cmd = [
            sys.executable,
            "-c",
            _DRIVER,
            str(tree),
            str(staged),
            "--outfile",
            str(part),
            "--outtype",
            outtype,
            *extra_args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not part.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise build.BuildError(f"converting {checkpoint} failed ({proc.returncode}):\n{tail}")
        part.replace(out)
    return out


def converted(checkpoint: Path, outtype: str = "f32", series: list[Path] | None = None) -> Path:
    """The cached GGUF of a checkpoint dir for this patch series (converted on first use)."""
    checkpoint = Path(checkpoint).resolve()
    # The checkpoint's identity, not its path: a checkpoint rewritten in place is converted again.
    ident = checkpoint_identity(checkpoint)
    key = hashlib.sha256(f"{ident}\0{series_key(series)}\0{outtype}".encode()).hexdigest()[:16]
    out = build.cache_root() / "port-gguf" / f"{checkpoint.name}-{outtype}-{key}.gguf"
    if not out.is_file():
        with locked(out.with_name(f".{out.name}.lock")):
            if not out.is_file():  # another process converted it while we waited
                convert(checkpoint, out, outtype, series=series)
    return out
