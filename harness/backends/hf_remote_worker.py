"""Child side of ``hf_remote``: the checkpoint's own modeling code under transformers'
``trust_remote_code``, with captures taken by forward hooks on its named modules.

Runs in its own process (``python -m harness.backends.hf_remote_worker WORKDIR``) so that the
transformers it imports can be the one the modeling file was written for (an overlay on
``PYTHONPATH``, :mod:`harness.backends.hf_remote_env`), not the main environment's.  Same protocol
as the llama.cpp worker (:func:`harness.llamacpp.worker.serve_requests`): one JSON request per
line; arrays travel as ``.npz`` files in WORKDIR.

- ``load``: ``{"checkpoint", "dtype"}`` -> facts (layers, transformers version, dtypes seen).
- ``forward``: ``{"tokens", "wanted"}`` -> npz of the wanted canonical points, token axis first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from harness.llamacpp.worker import WorkerError, run_child, serve_requests

# Module name (layer index as {i}) -> (which tensor, canonical stem).  The names are the
# checkpoint's own: remote code names its modules after its tensors.  "in": the module's first
# input; "out": its output (the first element of a tuple); "router": the gate's outputs, told
# apart by dtype and width (ids: integers; weights: k wide; logits: num_experts wide).
LAYER_HOOKS: tuple[tuple[str, str, str], ...] = (
    ("model.layers.{i}.input_layernorm", "out", "attn_norm"),
    ("model.layers.{i}.attention.kv_a_layernorm", "out", "kv_cmpr"),
    ("model.layers.{i}.attention.g_norm", "in", "gla_out"),
    ("model.layers.{i}.attention.g_proj", "out", "g_gate"),
    ("model.layers.{i}.attention", "out", "attn_out"),
    ("model.layers.{i}.post_attention_layernorm", "in", "ffn_inp"),
    ("model.layers.{i}.post_attention_layernorm", "out", "ffn_norm"),
    ("model.layers.{i}.mlp.gate", "router", "ffn_moe"),
    ("model.layers.{i}.mlp.shared_experts", "out", "ffn_shexp"),
    ("model.layers.{i}.mlp", "out", "ffn_out"),
    ("model.layers.{i}", "out", "l_out"),
)
GLOBAL_HOOKS: tuple[tuple[str, str, str], ...] = (
    ("model.norm", "out", "result_norm"),
    ("lm_head", "out", "result_output"),
)
DTYPES = ("float64", "float32", "bfloat16")


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else getattr(x, "logits", x)


def _rows(t: Any) -> np.ndarray:
    """A [1, T, ...] (or [T, ...]) tensor as a float64/int64 [T, ...] array."""
    import torch

    t = t.detach()
    if t.ndim >= 3 and t.shape[0] == 1:
        t = t[0]
    as_type = torch.float64 if t.is_floating_point() else torch.int64
    return t.to("cpu", as_type).numpy()


def _router(outputs: Any, n_experts: int) -> dict[str, np.ndarray]:
    """Router outputs -> ffn_moe_logits / ffn_moe_topk (sorted) / ffn_moe_weights (aligned)."""
    out: dict[str, np.ndarray] = {}
    tensors = [o for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs])
               if hasattr(o, "is_floating_point")]
    ids = next((t for t in tensors if not t.is_floating_point()), None)
    for t in tensors:
        if t.is_floating_point() and t.shape[-1] == n_experts:
            out["ffn_moe_logits"] = _rows(t).reshape(-1, n_experts)
    if ids is not None:
        k = ids.shape[-1]
        ids_np = _rows(ids).reshape(-1, k)
        order = np.argsort(ids_np, axis=-1, kind="stable")
        out["ffn_moe_topk"] = np.take_along_axis(ids_np, order, -1)
        weights = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == k
                        and t.shape[-1] != n_experts), None)
        if weights is not None:
            out["ffn_moe_weights"] = np.take_along_axis(_rows(weights).reshape(-1, k), order, -1)
    return out


class RemoteEngine:
    """One remote-code model and its hooks."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.model: Any = None
        self.store: dict[str, np.ndarray] | None = None
        self.wanted: frozenset[str] = frozenset()
        self.off_dtype: dict[str, str] = {}  # module class -> output dtype unlike the model's
        self._seq = 0

    def load(self, checkpoint: str, dtype: str) -> dict[str, Any]:
        # transformers copies remote code into its modules cache when imported: one per child
        os.environ["HF_MODULES_CACHE"] = str(self.workdir / "modules")
        import torch
        import transformers

        if dtype not in DTYPES:
            raise WorkerError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}", "input")
        self.dtype = getattr(torch, dtype)
        kwargs: dict[str, Any] = {"trust_remote_code": True}
        major = int(transformers.__version__.split(".")[0])
        minor = int(re.match(r"\d+", transformers.__version__.split(".")[1]).group())  # type: ignore[union-attr]
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = self.dtype
        self.model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
        self.model.eval()
        self.config = self.model.config
        self.n_layers = int(self.config.num_hidden_layers)
        hooked = self._hook()
        return {
            "n_layers": self.n_layers,
            "model_class": type(self.model).__name__,
            "transformers": transformers.__version__,
            "transformers_path": str(Path(transformers.__file__).parent),
            "torch": torch.__version__,
            "param_dtypes": sorted({str(p.dtype).removeprefix("torch.")
                                    for p in self.model.parameters()}),
            "hooked": hooked,
        }

    def _hook(self) -> int:
        modules = dict(self.model.named_modules())
        n_experts = int(getattr(self.config, "num_experts", 0) or 0)
        count = 0

        def attach(name: str, which: str, stem: str) -> None:
            nonlocal count
            module = modules.get(name)
            if module is None:
                return
            count += 1

            def hook(_mod: Any, args: Any, output: Any) -> None:
                if self.store is None:
                    return
                if which == "router":
                    for point, arr in _router(output, n_experts).items():
                        key = f"{point}{stem[len('ffn_moe'):]}"
                        if key in self.wanted:
                            self.store[key] = arr
                    return
                if stem in self.wanted:
                    self.store[stem] = _rows(args[0] if which == "in" else _first(output))

            module.register_forward_hook(hook)

        for i in range(self.n_layers):
            for name, which, stem in LAYER_HOOKS:
                attach(name.format(i=i), which, f"{stem}-{i}")
        for name, which, stem in GLOBAL_HOOKS:
            attach(name, which, stem)
        for module in modules.values():  # steps that do not run in the model's dtype
            module.register_forward_hook(self._watch_dtype)
        return count

    def _watch_dtype(self, module: Any, _args: Any, output: Any) -> None:
        if self.store is None:
            return
        outs = output if isinstance(output, (tuple, list)) else [getattr(output, "logits", output)]
        for out in outs:
            if hasattr(out, "is_floating_point") and out.is_floating_point() and (
                    out.dtype != self.dtype):
                self.off_dtype[type(module).__name__] = str(out.dtype).removeprefix("torch.")

    def forward(self, tokens: list[int], wanted: list[str]) -> dict[str, Any]:
        import torch

        if self.model is None:
            raise WorkerError("forward before load", "protocol")
        self.wanted = frozenset(wanted) | {"result_output"}
        self.store = {}
        try:
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([tokens], dtype=torch.long))
            self.store.setdefault("result_output", _rows(out.logits))
            captures = self.store
        finally:
            self.store = None
        self._seq += 1
        path = self.workdir / f"forward-{os.getpid()}-{self._seq}.npz"
        np.savez(path, **{k.replace("-", "__"): v for k, v in captures.items()})
        return {"npz": str(path), "off_dtype": dict(self.off_dtype)}

    def close(self) -> None:
        self.model = None


def _handle(engine: RemoteEngine, op: str, req: dict[str, Any]) -> dict[str, Any]:
    if op == "load":
        return engine.load(str(req["checkpoint"]), str(req.get("dtype", "float32")))
    if op == "forward":
        return engine.forward([int(t) for t in req["tokens"]], list(req.get("wanted", [])))
    raise WorkerError(f"unknown op {op!r}", "protocol")


def serve(inp: Any, out: Any, workdir: Path) -> None:
    serve_requests(inp, out, lambda: RemoteEngine(workdir), _handle)


def main() -> int:
    return run_child(serve)


if __name__ == "__main__":
    raise SystemExit(main())
