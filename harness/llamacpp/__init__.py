"""llama.cpp as a candidate backend, via a pinned, optionally patched llama-cpp-python build.

- :mod:`.build`: ``ensure_wheel`` / ``ensure_installed`` / ``sdist_tree`` (CLI:
  ``python -m harness.llamacpp.build [--install] [--patch P ...]``).
- :mod:`.worker` / :mod:`.client`: llama.cpp runs in a child process; ``WorkerClient`` loads a
  GGUF, feeds tokens, returns eval-callback captures and logits, and turns crashes, GGML_ASSERTs
  and hangs into ``PortFailure``.
- :mod:`.ggml_ctypes`: the ggml tensor getters llama-cpp-python does not bind.
- :mod:`.names`: llama.cpp callback names -> canonical capture points, per port.
- :mod:`.testing`: tiny GGUF writers for tests.

Nothing here imports ``llama_cpp`` at module import time, so the harness loads without it.
"""
