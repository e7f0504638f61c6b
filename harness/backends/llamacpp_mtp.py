"""llama.cpp's MTP head as an MTP candidate: the backend's conversion, then the MTP child.

The loader lives with the backends (it parses the llama.cpp backend's options and prepares the GGUF
the way :mod:`harness.backends.llamacpp_backend` does); the child process, its protocol and the
model it returns are :mod:`harness.llamacpp.mtp`'s, which knows no backend.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.backends.llamacpp_backend import llamacpp_options, parse_options, prepare_gguf
from harness.core.errors import ArchitectureNotSupported, InputError, PortFailure
from harness.llamacpp.mtp import LlamaCppMtpModel, MtpWorkerClient

__all__ = ["load_llamacpp_mtp"]


def _split_options(options: Any) -> tuple[Any, str, int]:
    """(the options, chain-hidden choice, rollback planes: 0 for ``mtp_rollback=state``), read
    from the backend's typed options (:class:`harness.backends.llamacpp_backend.LlamaCppOptions`,
    whose parser names a bad key or value)."""
    opts = llamacpp_options(options)
    return options, opts.mtp_chain, opts.mtp_rs_seq if opts.mtp_rollback == "seq_rm" else 0


def load_llamacpp_mtp(
    checkpoint_dir: Path, options: Any, label: str = "llamacpp"
) -> LlamaCppMtpModel:
    """Convert (cached), inventory, start the MTP child and load the GGUF with its MTP head.

    ``options``: the llama.cpp backend's (``harness.backends.llamacpp_backend``) plus
    ``mtp_chain=nextn|l_out`` (the hidden chained drafts reuse; see the module doc).
    """
    options, chain, rs_seq = _split_options(options)
    settings = parse_options(options)
    prep = prepare_gguf(checkpoint_dir, settings)
    if not int(prep.config.get("num_nextn_predict_layers") or 0):
        raise InputError(
            f"{Path(checkpoint_dir)}: num_nextn_predict_layers is 0: no MTP head to draft with"
        )
    gguf, env, family, findings = prep.gguf, prep.env, prep.family, prep.findings

    client = MtpWorkerClient(
        env=env, site=settings.site, timeout=settings.timeout, label=f"llama.cpp MTP ({gguf.name})"
    )
    params = replace(settings.params, load_mtp=True, n_rs_seq=rs_seq)
    try:
        info = client.request(
            {"op": "load", "model": str(gguf), "params": params.record(), "chain": chain},
            doing=f"loading {gguf.name} with its MTP head",
            timeout=client.load_timeout,
        )
    except PortFailure as e:
        client.close()
        if "unknown model architecture" in str(e):
            raise ArchitectureNotSupported(
                f"architecture not supported by this build: libllama refuses {gguf.name} "
                f"(unknown model architecture); the checkpoint is {family.name} "
                f"({family.architecture})"
            ) from None
        raise
    except BaseException:
        client.close()
        raise
    info.pop("ok", None)
    if not int(info.get("n_layer_nextn") or 0):
        client.close()
        raise PortFailure(f"{gguf.name}: llama.cpp loaded no NextN layer (n_layer_nextn = 0)")
    client.info = info
    return LlamaCppMtpModel(client, info, gguf, chain, label, findings)
