#!/usr/bin/env bash
# Export the bailing_hybrid port from its work tree into ports/llamacpp/patches/ as git-apply
# patches against the llama.cpp vendored by llama-cpp-python 0.3.36 (llama.cpp@0c1e57098).
#
# The work tree is a copy of the sdist's vendor/llama.cpp made a git repo with ONE commit (the
# pristine tree); edits stay uncommitted there.  Create it with:
#   python -c "from ports.llamacpp.port import init_work_tree; print(init_work_tree())"
# Usage: ports/llamacpp/export_patches.sh [WORK_TREE]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-${BAILING_PORT_WORK:-$HOME/.cache/bailing-parity/port-work/llama.cpp}}"
out="$here/patches"
[ -d "$work/.git" ] || { echo "no git work tree at $work" >&2; exit 2; }

cd "$work"
git add -A            # new files become part of the diff; nothing is committed
base="$(git rev-list --max-parents=0 HEAD)"

export_one() {        # name, paths...
    local name="$1"; shift
    git diff --cached --binary --full-index "$base" -- "$@" > "$out/$name.tmp"
    if [ ! -s "$out/$name.tmp" ]; then
        echo "error: $name would be empty" >&2; rm -f "$out/$name.tmp"; exit 1
    fi
    mv "$out/$name.tmp" "$out/$name"
    echo "$out/$name ($(grep -c '^+' "$out/$name") added lines)"
}

mkdir -p "$out"
rm -f "$out"/0*.patch
export_one 0001-bailing_hybrid-gguf-py-and-converter.patch gguf-py conversion convert_hf_to_gguf.py
export_one 0002-bailing_hybrid-arch-hparams-memory.patch \
    src/llama-arch.h src/llama-arch.cpp src/llama-hparams.h src/llama-hparams.cpp \
    src/llama-model.cpp src/llama-context.cpp src/llama-quant.cpp src/models/models.h
export_one 0003-bailing_hybrid-graph.patch src/models/bailing-hybrid.cpp

# anything else changed in the work tree would silently be left out: refuse
others="$(git diff --cached --name-only "$base" -- . \
    ':!gguf-py' ':!conversion' ':!convert_hf_to_gguf.py' ':!src/llama-arch.h' ':!src/llama-arch.cpp' \
    ':!src/llama-hparams.h' ':!src/llama-hparams.cpp' ':!src/llama-model.cpp' ':!src/llama-context.cpp' ':!src/llama-quant.cpp' \
    ':!src/models/models.h' ':!src/models/bailing-hybrid.cpp')"
if [ -n "$others" ]; then
    echo "error: changed files not covered by any patch:" >&2; echo "$others" >&2; exit 1
fi
