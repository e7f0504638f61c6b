"""``hf_remote``: the checkpoint's own modeling code as one more candidate.

A checkpoint directory that ships its modeling code (``auto_map`` in config.json naming, e.g.,
``modeling_bailing_moe_v2_5.BailingMoeV2_5ForCausalLM``, and that file beside the weights) runs
through transformers' ``trust_remote_code`` in a child process
(:mod:`harness.backends.hf_remote_worker`) on the transformers the file was written for
(:mod:`harness.backends.hf_remote_env`).  Captures come from forward hooks on the modules named
after the checkpoint's tensors, mapped to our capture points.  The authors' code is a port like
any other: compared per point with the reference, and diagnosed by the slopes check (which is how
``--slope auto`` reads a checkpoint's GLA convention off it).

A session recomputes the whole prefix on every ``feed`` (exact for a causal model), so the
authors' cache path is not what ``decode`` exercises here.  Steps whose outputs are not in the
dtype the model runs in (e.g. float32 casts inside a float64 run) are reported as findings.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import Availability, BackendOptions, Captures, wanted_points
from harness.backends.options import NoOptions, parse_options
from harness.core.errors import ArchitectureNotSupported, InputError

LABEL = "hf_remote"
DTYPES = ("float64", "float32", "bfloat16")


def remote_code_of(checkpoint: Path) -> str | None:
    """The modeling file a checkpoint ships for ``AutoModelForCausalLM`` (None: it ships none).

    A config naming a file that is not in the directory is refused: the checkpoint is
    incomplete, not a port's failure."""
    path = Path(checkpoint) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    entry = (auto_map or {}).get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if not entry:
        return None
    if not isinstance(entry, str) or "--" in entry or "." not in entry:
        raise InputError(f"{path}: auto_map.AutoModelForCausalLM = {entry!r}: expected "
                         "'module.Class' naming a file in the checkpoint directory")
    module = entry.rsplit(".", 1)[0]
    file = Path(checkpoint) / f"{module.replace('.', '/')}.py"
    if not file.is_file():
        raise InputError(f"{path}: auto_map names {entry!r} but {file.name} is not in "
                         f"{Path(checkpoint)}")
    return file.name


class HfRemoteBackend:
    """Loads a checkpoint's remote code into a child process."""

    name = LABEL

    def availability(self) -> Availability:
        for package in ("torch", "transformers"):
            if find_spec(package) is None:
                return Availability(False, f"{package} is not importable")
        return Availability(True)

    def load(self, checkpoint_dir: Path, options: BackendOptions) -> RemoteModel:
        checkpoint = Path(checkpoint_dir).resolve()
        modeling = remote_code_of(checkpoint)
        if modeling is None:
            raise ArchitectureNotSupported(
                f"{checkpoint}: ships no modeling code of its own (no auto_map "
                "AutoModelForCausalLM in config.json): nothing for hf_remote to run")
        if options.dtype not in DTYPES:
            raise InputError(f"{LABEL}: unknown dtype {options.dtype!r}; known: "
                             f"{', '.join(DTYPES)}")
        if not isinstance(options.settings, NoOptions):
            parse_options(NoOptions, options.extra, LABEL)  # it has no knobs: any is refused
        from harness.backends.hf_remote_env import remote_env

        return RemoteModel(checkpoint, modeling, options.dtype, remote_env(checkpoint))


class RemoteModel:
    """The remote-code model in its child; ``findings`` say what ran and how."""

    def __init__(self, checkpoint: Path, modeling: str, dtype: str, env: Any) -> None:
        from harness.llamacpp.client import WorkerClient

        self.checkpoint, self.modeling, self.dtype = checkpoint, modeling, dtype
        self._client = WorkerClient(python=env.python, site=env.overlay, label=LABEL,
                                    module="harness.backends.hf_remote_worker",
                                    env=_child_environment())
        try:
            self.info = self._client.request(
                {"op": "load", "checkpoint": str(checkpoint), "dtype": dtype},
                doing=f"loading {modeling} from {checkpoint}",
                timeout=self._client.load_timeout)
        except BaseException:
            self._client.close()
            raise
        self.n_layers = int(self.info["n_layers"])
        self.off_dtype: dict[str, str] = {}
        self._notes = [env.note,
                       f"hf_remote: {checkpoint.name}/{modeling} ({self.info['model_class']}) "
                       f"ran with transformers {self.info['transformers']} in {dtype}; "
                       f"{self.info['hooked']} modules hooked for captures"]

    @property
    def findings(self) -> list[str]:
        """What ran, on which transformers, and any step that left the model's dtype."""
        out = list(self._notes)
        if self.off_dtype:
            steps = ", ".join(f"{m} -> {d}" for m, d in sorted(self.off_dtype.items()))
            out.append(f"hf_remote: steps inside {self.modeling} that do not run in {self.dtype}"
                       f": {steps}")
        return out

    def start(self, capture: Collection[str] = ()) -> RemoteSession:
        return RemoteSession(self, wanted_points(capture))

    def forward(self, tokens: Sequence[int], wanted: Collection[str]) -> Captures:
        reply = self._client.request(
            {"op": "forward", "tokens": [int(t) for t in tokens], "wanted": sorted(wanted)},
            doing=f"running {self.modeling} on {len(tokens)} token(s)")
        self.off_dtype.update(reply.get("off_dtype", {}))
        path = Path(reply["npz"])
        try:
            with np.load(path) as npz:
                return {k.replace("__", "-"): npz[k] for k in npz.files}
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._client.close()


class RemoteSession:
    """One sequence: each feed recomputes the prefix and returns the new tokens' rows."""

    def __init__(self, model: RemoteModel, wanted: frozenset[str]) -> None:
        self._m, self._wanted = model, wanted
        self._tokens: list[int] = []

    def feed(self, tokens: Sequence[int]) -> Captures:
        new = [int(t) for t in tokens]
        self._tokens += new
        caps = self._m.forward(self._tokens, self._wanted)
        return {k: v[-len(new):] for k, v in caps.items()}


def _child_environment() -> dict[str, str]:
    """The child's environment: offline (the checkpoint is local) and with no stale
    PYTHONPATH entry that could shadow the overlay's transformers."""
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env
