"""GGUF inventory: every checkpoint tensor accounted for through the port's map, before any run.

A converter that drops a tensor, a GGUF missing a metadata key the loader needs, or a key whose
value disagrees with config.json (``expert_group_count`` silently absent -> routing without the
group limit) is cheaper to name here than to chase as a numeric divergence later.  Reads the GGUF
with the ``gguf`` package's ``GGUFReader`` (memory-mapped: no tensor data is loaded) and the
checkpoint's safetensors headers only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import InputError
from harness.llamacpp.tensor_maps import (
    PORT_MAPS,
    VARIABLES,
    PortTensorMap,
    TensorRule,
    evaluate,
    hf_pattern,
    layer_kinds,
    map_for_gguf,
    split_layer,
)

_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
               "tokenizer.ggml.scores")
LIST_LIMIT = 12  # names shown per category in a rendered finding


@dataclass
class Inventory:
    """What the GGUF holds against what the port's map and the checkpoint say it should."""

    gguf: Path
    arch: str
    port: str | None
    n_tensors: int
    n_checkpoint_tensors: int = 0
    missing_keys: list[str] = field(default_factory=list)  # required metadata absent
    unmapped: list[str] = field(default_factory=list)  # checkpoint tensors not accounted for
    missing: list[str] = field(default_factory=list)  # expected GGUF tensors absent
    unexpected: list[str] = field(default_factory=list)  # GGUF tensors nothing accounts for
    shape_mismatches: list[str] = field(default_factory=list)  # ne vs metadata
    count_mismatches: list[str] = field(default_factory=list)  # elements HF vs GGUF
    metadata_mismatches: list[str] = field(default_factory=list)  # GGUF key vs config.json
    notes: list[str] = field(default_factory=list)  # checks that could not be made

    @property
    def ok(self) -> bool:
        """No category holds anything (notes aside)."""
        return not any(
            (self.missing_keys, self.unmapped, self.missing, self.unexpected,
             self.shape_mismatches, self.count_mismatches, self.metadata_mismatches)
        )


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int, str]]]:
    """(metadata, tensors) of a GGUF: key -> value (big tokenizer arrays -> their length),
    tensor name -> (ne, element count, ggml type name)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # truncated or not a GGUF at all
        raise InputError(f"{path}: not a readable GGUF ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = len(f.data) if key in _BIG_ARRAYS else f.contents()
    tensors = {
        t.name: (tuple(int(x) for x in t.shape), int(t.n_elements), t.tensor_type.name)
        for t in reader.tensors
    }
    return meta, tensors


def metadata_variables(port: PortTensorMap, meta: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for var, suffixes in VARIABLES.items():
        for s in suffixes:
            v = meta.get(f"{port.arch}.{s}")
            if isinstance(v, list):  # per-layer arrays: the non-zero value (head counts)
                v = next((x for x in v if x), None)
            if v is not None:
                out[var] = int(v)
                break
    if "n_vocab" not in out and "tokenizer.ggml.tokens" in meta:
        out["n_vocab"] = int(meta["tokenizer.ggml.tokens"])
    return out


def _applies(r: TensorRule, kinds: frozenset[str], variables: Mapping[str, int]) -> bool:
    if r.when and r.when not in kinds:
        return False
    # q-LoRA decides between attn_q_a/attn_q_b and a plain attn_q on MLA layers
    if r.hf.startswith("attention.q_a") or r.hf == "attention.q_b_proj.weight":
        return variables.get("q_lora_rank", 0) > 0
    if r.hf == "attention.q_proj.weight" and r.when == "mla":
        return variables.get("q_lora_rank", 0) == 0
    return True


def expected_from_metadata(
    port: PortTensorMap, meta: Mapping[str, Any]
) -> dict[str, tuple[tuple[str, ...], bool]]:
    """GGUF name -> (ne expressions, optional) for every tensor the metadata implies."""
    variables = metadata_variables(port, meta)
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    for r in port.global_rules:
        for name, ne in zip(r.gguf, r.ne, strict=True):
            out.setdefault(name, (ne, r.optional))
    for il, kinds in enumerate(layer_kinds(port, meta)):
        for r in port.layer_rules:
            if _applies(r, kinds, variables):
                for name, ne in zip(r.gguf, r.ne, strict=True):
                    out.setdefault(f"blk.{il}.{name}", (ne, r.optional))
    return out


def _sorted_list_text(values: Collection[str], limit: int = LIST_LIMIT) -> str:
    """The first ``limit`` values, sorted and comma-separated, with how many more there are."""
    items = sorted(values)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_config(
    inv: Inventory, port: PortTensorMap, meta: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
    """GGUF metadata against config.json, key by key (see PortTensorMap.config_keys)."""
    for suffix, cfg_keys in port.config_keys.items():
        cfg_key = next((k for k in cfg_keys if k in config), None)
        if cfg_key is None or config[cfg_key] is None:
            continue
        want = config[cfg_key]
        key = f"{port.arch}.{suffix}"
        if key not in meta:
            if suffix.startswith("expert_group") and int(config.get(cfg_key) or 1) <= 1:
                continue  # one group: no group limit to lose
            inv.metadata_mismatches.append(
                f"{key} absent but config.json has {cfg_key}={want!r}"
                + (" (llama.cpp then routes without the group limit)"
                   if suffix == "expert_group_count" else "")
            )
            continue
        got = meta[key]
        if isinstance(want, bool) or isinstance(got, bool):
            same = bool(got) == bool(want)
        elif isinstance(want, int | float) and isinstance(got, int | float):
            same = math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=0.0)
        else:
            same = got == want
        if not same:
            inv.metadata_mismatches.append(f"{key}={got!r} but config.json has {cfg_key}={want!r}")


@dataclass
class CheckpointMapping:
    """HF tensors pushed through a port's map."""

    groups: list[tuple[list[str], list[str], int]]  # (GGUF names, HF names, HF elements)
    sources: dict[str, list[str]]  # GGUF name -> HF names feeding it
    unmapped: list[str]  # HF names (with the reason) the map does not account for


def map_checkpoint(
    port: PortTensorMap,
    shapes: Mapping[str, tuple[int, ...]],
    kinds: list[frozenset[str]],
    variables: Mapping[str, int],
) -> CheckpointMapping:
    """Map every HF tensor (name -> shape) onto GGUF names for blocks of the given kinds."""
    groups: dict[tuple[int, int | None], tuple[TensorRule, list[str], int]] = {}
    sources: dict[str, list[str]] = {}
    unmapped: list[str] = []
    for hf_name, shape in shapes.items():
        il, rest = split_layer(hf_name)
        rules = port.global_rules if il is None else port.layer_rules
        matching = [(i, r) for i, r in enumerate(rules) if hf_pattern(r).match(rest)]
        if il is not None and il >= len(kinds):
            unmapped.append(f"{hf_name} (layer {il} beyond block_count {len(kinds)})")
            continue
        fitting = [(i, r) for i, r in matching if il is None or _applies(r, kinds[il], variables)]
        if not fitting:
            if matching and il is not None:
                whens = "/".join(sorted({r.when for _, r in matching}))
                unmapped.append(
                    f"{hf_name} (mapped only on {whens} layers; the GGUF makes layer {il} "
                    f"{'+'.join(sorted(kinds[il]))})"
                )
            else:
                unmapped.append(f"{hf_name} (no rule in {port.name})")
            continue
        i, r = fitting[0]
        key = (i + (0 if il is None else 1000), il)
        rule_, names, n = groups.get(key, (r, [], 0))
        groups[key] = (rule_, [*names, hf_name], n + math.prod(shape))
        for g in r.gguf:
            sources.setdefault(g if il is None else f"blk.{il}.{g}", []).append(hf_name)
    out = [
        ([g if il is None else f"blk.{il}.{g}" for g in r.gguf], hf, n)
        for (_, il), (r, hf, n) in sorted(
            groups.items(), key=lambda kv: (-1 if kv[0][1] is None else kv[0][1], kv[0][0])
        )
    ]
    return CheckpointMapping(out, sources, unmapped)


def inventory(
    gguf: Path | str, checkpoint: Path | str | None = None, *, port: str | None = None
) -> Inventory:
    """Check ``gguf`` against its port's map (by ``general.architecture`` unless ``port``) and,
    when given, the HF ``checkpoint`` it was converted from."""
    from harness.llamacpp.convert import tensor_shapes

    gguf = Path(gguf)
    meta, tensors = read_gguf(gguf)
    arch = str(meta.get("general.architecture", ""))
    pmap = PORT_MAPS.get(port) if port else map_for_gguf(meta)
    if port and pmap is None:
        raise InputError(f"unknown port tensor map {port!r}; known: {', '.join(PORT_MAPS)}")
    inv = Inventory(gguf=gguf, arch=arch, port=pmap.name if pmap else None, n_tensors=len(tensors))
    if pmap is None:
        inv.notes.append(
            f"no tensor map for GGUF architecture {arch!r} (known: "
            f"{', '.join(sorted({m.arch for m in PORT_MAPS.values()}))}): tensors not accounted for"
        )
        return inv
    inv.missing_keys = [f"{arch}.{k}" for k in pmap.required_keys if f"{arch}.{k}" not in meta]
    variables = metadata_variables(pmap, meta)
    expected = expected_from_metadata(pmap, meta)
    mtp_blocks = [il for il, k in enumerate(layer_kinds(pmap, meta)) if "mtp" in k]
    if mtp_blocks and not any(f"blk.{il}.nextn.eh_proj.weight" in tensors for il in mtp_blocks):
        # the loader's "trunk only" case: MTP blocks announced, none of their tensors present
        prefixes = tuple(f"blk.{il}." for il in mtp_blocks)
        expected = {n: (ne, opt or n.startswith(prefixes)) for n, (ne, opt) in expected.items()}
        inv.notes.append(
            f"trunk-only GGUF: nextn_predict_layers announces MTP block(s) {mtp_blocks} but it "
            "holds none of their tensors (llama.cpp loads it; no MTP)"
        )

    from_ckpt: dict[str, list[str]] = {}  # GGUF name -> HF names feeding it
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        shapes = tensor_shapes(checkpoint)
        inv.n_checkpoint_tensors = len(shapes)
        mapping = map_checkpoint(pmap, shapes, layer_kinds(pmap, meta), variables)
        inv.unmapped, from_ckpt = mapping.unmapped, mapping.sources
        for names, hf, n_hf in mapping.groups:
            if any(n not in tensors for n in names):
                continue  # reported as missing below
            n_gguf = sum(tensors[n][1] for n in names)
            if n_hf != n_gguf:
                src = hf[0] if len(hf) == 1 else f"{len(hf)} tensors like {hf[0]}"
                inv.count_mismatches.append(
                    f"{'+'.join(names)}: {n_gguf} elements but {src} has {n_hf}"
                )
        _check_config(inv, pmap, meta, json.loads((checkpoint / "config.json").read_text()))

    wanted = set(from_ckpt) | {n for n, (_, opt) in expected.items() if not opt or n in from_ckpt}
    for name in sorted(wanted - set(tensors)):
        src = from_ckpt.get(name)
        why = f" (from {_sorted_list_text(src, 2)})" if src else " (metadata implies it)"
        inv.missing.append(name + why)
    inv.unexpected = sorted(set(tensors) - set(from_ckpt) - set(expected))
    for name, (ne, _) in expected.items():
        if name not in tensors:
            continue
        try:
            want = tuple(evaluate(e, variables) for e in ne)
        except KeyError as e:
            inv.notes.append(f"{name}: shape not checked (metadata variable {e} absent)")
            continue
        if tensors[name][0] != want:
            inv.shape_mismatches.append(
                f"{name}: ne {list(tensors[name][0])} but the metadata implies {list(want)} "
                f"({', '.join(ne)})"
            )
    return inv


def render(inv: Inventory) -> list[str]:
    """One finding per non-empty category (nothing when the inventory is clean)."""
    head = (
        f"GGUF inventory of {inv.gguf.name} ({inv.arch}, {inv.n_tensors} tensors, "
        f"map {inv.port or 'none'})"
    )
    out = []
    for label, items in (
        ("required metadata keys missing", inv.missing_keys),
        ("tensors missing from the GGUF", inv.missing),
        ("checkpoint tensors the port's map does not account for", inv.unmapped),
        ("GGUF tensors nothing accounts for", inv.unexpected),
        ("shapes inconsistent with the metadata", inv.shape_mismatches),
        ("element counts differing from the checkpoint", inv.count_mismatches),
        ("metadata disagreeing with config.json", inv.metadata_mismatches),
    ):
        if items:
            out.append(f"{head}: {label}: {_sorted_list_text(items)}")
    if inv.notes and (out or inv.port is None):
        out.append(f"{head}: notes: {_sorted_list_text(inv.notes, 4)}")
    return out


def rewrite_gguf(
    src: Path | str,
    dst: Path | str,
    *,
    drop_tensors: Collection[str] = (),
    drop_keys: Collection[str] = (),
    set_keys: Mapping[str, Any] | None = None,
    add_tensors: Mapping[str, Any] | None = None,
) -> Path:
    """Copy a GGUF without some tensors or keys, with some key values replaced (same type) or
    extra float32 tensors added: to provoke, and test, port failures and inventory findings."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    unknown = set(drop_tensors) - {t.name for t in reader.tensors}
    unknown |= set(drop_keys) - set(reader.fields)
    if unknown:
        raise InputError(f"{src}: nothing named {sorted(unknown)} to drop")
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        if f.name in drop_keys:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = (set_keys or {}).get(f.name, f.contents())
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    kept = [t for t in reader.tensors if t.name not in drop_tensors]
    extra = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (add_tensors or {}).items()}
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    for name, arr in extra.items():
        f32 = gguf.GGMLQuantizationType.F32
        writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    for arr in extra.values():
        writer.write_tensor_data(arr)
    writer.close()
    return Path(dst)
