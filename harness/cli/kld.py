"""``python -m harness kld``: KLD over a corpus, as ``llama-perplexity --kl-divergence``.

    python -m harness kld --checkpoint DIR [--corpus FILE] [--ctx N] [--chunks K] \\
        --backends LIST [--save-base DIR | --base DIR] [--out RUN_DIR]

Exit codes: 0 every backend ran; 1 a backend crashed (its finding; the others are reported);
2 bad input (named), found before any model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.targets import REFERENCE, Target, parse_targets
from harness.checks.slope_convention import CHOICES as SLOPE_CHOICES
from harness.core.errors import InputError, PortFailure, ReferenceFailure

REPO_README = Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_CTX = 512


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "kld", help="KLD, Δp, same-top and perplexity of each backend against the float64 "
                    "reference over a text corpus, in llama-perplexity's table")
    p.set_defaults(func=run)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="HF-layout directory: config.json + model*.safetensors (+ index) and "
                        "its tokenizer (tokenizer.json or tokenizer.model)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="UTF-8 text file, tokenized whole by the checkpoint's tokenizer; default: "
                        "this repository's README.md (text the project wrote). With --base: the "
                        "base's own tokens unless given (then they must match)")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"tokens per chunk (default {DEFAULT_CTX}, or the base's); each chunk is "
                        "one fresh forward and, as in llama-perplexity, its positions ctx/2 .. "
                        "ctx-2 are scored")
    p.add_argument("--chunks", type=int, default=None,
                   help="number of chunks (default: every whole chunk the corpus holds)")
    p.add_argument("--backends", default="torch-float32,mlx",
                   help="candidates, e.g. 'torch-float32,mlx,llamacpp' (default torch-float32,mlx)")
    p.add_argument("--reference-load", choices=("auto", "memory", "streamed"), default="auto",
                   help="the reference's weights: in memory, or streamed layer by layer")
    p.add_argument("--slope", choices=SLOPE_CHOICES, default=None,
                   help="the checkpoint's GLA slope convention (Ling-2.6), as for parity")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--save-base", type=Path, default=None,
                      help="also keep the reference's scored logits in this new folder "
                           "(manifest.json + one float64 safetensors file per chunk)")
    base.add_argument("--base", type=Path, default=None,
                      help="a folder from --save-base: its logits stand for the reference, which "
                           "is not loaded; refused (exit 2) for another checkpoint, ctx, chunk "
                           "count or corpus")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (new or empty); default reports/<time>-kld")


def corpus_ids(checkpoint: Path, corpus: Path) -> tuple[list[int], int | None]:
    """The corpus's ids through the checkpoint's tokenizer (no special tokens) and the BOS id
    that tokenizer adds, if any."""
    from harness.cli.prompts import Tokenization, has_tokenizer, read_text

    if not corpus.is_file():
        raise InputError(f"{corpus}: --corpus file not found (expected a UTF-8 text file)")
    text = read_text(corpus)
    if not has_tokenizer(checkpoint):
        raise InputError(f"{checkpoint}: no tokenizer (expected tokenizer.json or "
                         f"tokenizer.model) to tokenize the corpus {corpus}; --base DIR brings "
                         "its own tokens")
    tok = Tokenization(checkpoint)
    ids = tok.encode(text, special=False)
    probe_plain, probe = tok.encode("a", special=False), tok.encode("a", special=True)
    bos = probe[0] if len(probe) == len(probe_plain) + 1 and probe[1:] == probe_plain else None
    return ids, bos


def _check_vocab(chunks: Any, vocab_size: int, checkpoint: Path) -> None:
    bad = chunks.tokens[(chunks.tokens < 0) | (chunks.tokens >= vocab_size)]
    if bad.size:
        raise InputError(f"{checkpoint}: the tokenizer gave ids {bad[:5].tolist()} outside the "
                         f"model's vocabulary [0, {vocab_size}) (does its tokenizer.json belong "
                         "to this checkpoint?)")


def run(args: argparse.Namespace) -> int:
    """Validate everything, run the reference once (or read --base), then each backend."""
    from harness.backends.families import load_checkpoint_config
    from harness.checks.corpus_kld import CorpusKld, split_corpus
    from harness.checks.golden import checkpoint_fingerprint, config_digest, target_json, versions
    from harness.checks.kld_base import open_base, writing_base
    from harness.checks.slope_convention import SlopeConvention
    from harness.cli.inputs import check_prompt_limits, checkpoint_convention, reference_target
    from harness.core import lifecycle
    from harness.report.run_folder import check_out_dir
    from references.config import read_config_json

    _, cfg = load_checkpoint_config(args.checkpoint)
    check_out_dir(args.out)
    checkpoint = args.checkpoint.resolve()
    raw = read_config_json(checkpoint / "config.json")
    corpus = args.corpus if args.corpus is not None else REPO_README
    notes: list[str] = []
    base = None
    if args.base is not None:
        base = open_base(args.base)
        base.check_checkpoint(checkpoint, raw)
        given = None
        if args.corpus is not None:
            ids, bos = corpus_ids(checkpoint, args.corpus)
            given = split_corpus(ids, base.ctx, base.n_chunks, bos=bos, source=str(corpus))[0]
        base.check_run(ctx=args.ctx, chunks=args.chunks,
                       tokens=None if given is None else given.tokens, corpus=args.corpus)
        from harness.checks.corpus_kld import Chunks

        chunks = Chunks(base.tokens())
        ref = base.manifest["reference"]
        reference = Target(ref["backend"], ref["dtype"], tuple(tuple(kv) for kv in ref["extra"]))
        recorded = base.manifest.get("slope_convention")
        convention = SlopeConvention(**recorded) if recorded is not None else None
        if args.slope is not None and (convention is None or args.slope != convention.slope):
            raise InputError(f"--slope {args.slope}: the base's reference computed with "
                             f"{convention.slope if convention else 'none'}; leave --slope out")
        corpus = Path(base.manifest.get("corpus", {}).get("path", str(args.base)))
    else:
        ids, bos = corpus_ids(checkpoint, corpus)
        chunks, notes = split_corpus(ids, args.ctx or DEFAULT_CTX, args.chunks, bos=bos,
                                     source=str(corpus))
        convention = checkpoint_convention(args, cfg)
        reference = reference_target(REFERENCE, args.reference_load)
        if convention is not None:
            reference = convention.target(reference)
    _check_vocab(chunks, cfg.vocab_size, checkpoint)
    check_prompt_limits([int(t) for t in chunks.tokens[0]], cfg, decode_steps=1, modes=(),
                        beyond_max_positions=False)
    candidates = parse_targets(args.backends)
    if convention is not None:
        candidates = [convention.target(c) for c in candidates]
    if convention is not None and base is None:
        notes.append(convention.note)

    job = CorpusKld(checkpoint, chunks, progress=_progress)
    tempdir = fd = None
    try:
        if base is None:
            ok, why = job.runner.availability(reference)
            if not ok:
                raise InputError(f"the reference {reference.label} cannot run here: {why}")
            folder = args.save_base
            if folder is None:
                tempdir, fd = lifecycle.owned_tempdir("bailing-parity-kld-")
                folder = tempdir / "base"
            manifest = {
                "checkpoint": str(checkpoint), "config": raw, "config_sha256": config_digest(raw),
                "fingerprint": checkpoint_fingerprint(checkpoint), "ctx": chunks.ctx,
                "n_chunks": chunks.n_chunks, "first": chunks.first,
                "reference": {**target_json(reference), "load": args.reference_load},
                "slope_convention": convention.to_json() if convention is not None else None,
                "corpus": {"path": str(corpus)}, "versions": versions(),
            }
            with writing_base(folder, manifest) as writer:
                try:
                    job.save_reference(reference, writer)
                except PortFailure as e:
                    raise ReferenceFailure(f"the reference could not run {checkpoint}: {e}"
                                           ) from None
            base = open_base(folder)
            if args.save_base is not None:
                notes.append(f"reference logits saved to {args.save_base} (reuse: --base)")
        else:
            notes.append(f"reference logits read from {args.base}; the reference was not loaded")
        results = [job.against_itself(f"{reference.label} (itself)", base)]
        for cand in candidates:
            ok, why = job.runner.availability(cand)
            if not ok:
                notes.append(f"{cand.label} not run: {why}")
                continue
            results.append(job.backend(cand, base))
    finally:
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)
            os.close(fd)
    return _report(args, job, results, reference, corpus, notes)


def _progress(message: str) -> None:
    if os.environ.get("BAILING_PARITY_PROGRESS", "") != "off":
        print(f"kld: {message}", file=sys.stderr)


def _report(args: argparse.Namespace, job: Any, results: list, reference: Target,
            corpus: Path, notes: list[str]) -> int:
    """Print the tables, write the run folder; 1 when a backend crashed or none ran."""
    from harness.checks.corpus_kld import kld_section, token_table
    from harness.report.environment import environment
    from harness.report.run_folder import write_run

    chunks = job.chunks
    failed = [r for r in results if r.error is not None]
    findings = [*notes, *(str(r.error) for r in failed),  # each names its backend
                *job.runner.findings]
    summary = {
        "command": "kld", "checkpoint": str(job.checkpoint), "corpus": str(corpus),
        "ctx": chunks.ctx, "n_chunks": chunks.n_chunks, "first_scored": chunks.first,
        "scored_per_chunk": chunks.n_scored, "reference": reference.label,
        "base": str(args.base) if args.base is not None else None,
        "saved_base": str(args.save_base) if args.save_base is not None else None,
        "loaded": list(job.runner.loaded), "findings": findings,
        "backends": [r.to_json() for r in results],
    }
    summary["exit_code"] = 1 if failed or len(results) < 2 else 0
    table = token_table(results)
    out = write_run([], Path("reports"), title=f"corpus KLD: {job.checkpoint.name}",
                    findings=findings, environment=environment(), name="kld", out=args.out,
                    sections=[kld_section(results, chunks, str(corpus), reference.label)],
                    summary=json.loads(json.dumps(summary, default=_jsonable)),
                    extra=lambda folder: table.to_parquet(folder / "kld.parquet", index=False))
    print(f"corpus {corpus}: {chunks.n_chunks} chunks of {chunks.ctx} tokens, positions "
          f"{chunks.first}..{chunks.ctx - 2} scored ({chunks.n_chunks * chunks.n_scored} tokens "
          f"per backend), against {reference.label}")
    for r in results:
        print(llama_table(r.label, reference.label, r.summary) if r.error is None
              else f"\n###### {r.label} ######\ncrashed: {r.error}")
    print(overview(results))
    for f in findings:
        print(f"note: {f}", file=sys.stderr)
    print(f"report: {out / 'index.html'}")
    return int(summary["exit_code"])


def _jsonable(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else str(x)


def llama_table(label: str, base_label: str, s: dict[str, float] | None) -> str:
    """``llama-perplexity --kl-divergence``'s closing statistics, line for line."""
    assert s is not None
    pct = 100.0
    lines = [
        f"\n###### {label} vs {base_label} ({s['n_tokens']} tokens) ######",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['mean_ppl_q']:10.6f} ± {s['mean_ppl_q_unc']:10.6f}",
        f"Mean PPL(base)                : {s['mean_ppl_base']:10.6f} ± "
        f"{s['mean_ppl_base_unc']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {pct * s['cor_ln_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['mean_ln_ppl_ratio']:10.6f} ± "
        f"{s['mean_ln_ppl_ratio_unc']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['mean_ppl_ratio']:10.6f} ± "
        f"{s['mean_ppl_ratio_unc']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['mean_ppl_diff']:10.6f} ± "
        f"{s['mean_ppl_diff_unc']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['mean_kld']:10.6f} ± {s['mean_kld_unc']:10.6f}",
    ]
    names = {"max": "Maximum", "median": "Median ", "min": "Minimum"}
    for key in ("max", "99.9", "99", "95", "90", "median", "10", "5", "1", "0.1", "min"):
        head = names.get(key) or f"{float(key):4.1f}%  "
        lines.append(f"{head} KLD: {s[f'kld_{key}']:10.6f}")
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {pct * s['mean_delta_p']:6.3f} ± {pct * s['mean_delta_p_unc']:5.3f} %"]
    for key in ("max", "99.9", "99", "95", "90", "75", "median", "25", "10", "5", "1", "0.1",
                "min"):
        head = names.get(key) or f"{float(key):4.1f}%  "
        lines.append(f"{head} Δp: {pct * s[f'delta_p_{key}']:6.3f}%")
    lines += [f"RMS Δp    : {pct * s['rms_delta_p']:6.3f} ± {pct * s['rms_delta_p_unc']:5.3f} %",
              f"Same top p: {pct * s['same_top_p']:6.3f} ± {pct * s['same_top_p_unc']:5.3f} %"]
    return "\n".join(lines)


def overview(results: list) -> str:
    """One line per backend (llama's numbers in full precision: fixed six decimals hide a
    float32 port's KLD), as a plain-text rich table."""
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title="corpus KLD against the reference")
    for col in ("backend", "PPL(Q)", "ln(PPL(Q)/PPL(base))", "Mean KLD", "99.0% KLD",
                "Maximum KLD", "RMS Δp", "Same top p"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in results:
        s = r.summary
        if s is None:
            table.add_row(r.label, "crashed", "", "", "", "", "", "")
            continue
        table.add_row(r.label, f"{s['mean_ppl_q']:.6g}", f"{s['mean_ln_ppl_ratio']:.3e}",
                      f"{s['mean_kld']:.3e}", f"{s['kld_99']:.3e}", f"{s['kld_max']:.3e}",
                      f"{100 * s['rms_delta_p']:.3e} %",
                      f"{100 * s['same_top_p']:.3f} ± {100 * s['same_top_p_unc']:.3f} %")
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False, color_system=None).print(table)
    return buf.getvalue().rstrip()
