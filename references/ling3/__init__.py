"""Ling 3.0 (``BailingMoeV3ForCausalLM``: MLA + KDA linear attention, grouped sigmoid MoE).

The second family of the harness.  Unlike Ling-2.6 there is no hand-written reference here: the
ground truth is transformers' ``BailingHybridForCausalLM``
(:mod:`harness.backends.transformers_ling3`).
This package validates Ling 3.0 configs (:mod:`.config`), writes synthetic checkpoints with
transformers (:mod:`.synthetic`) and normalises them so transformers, mlx-lm and llama.cpp's
converter all read the same directory (:mod:`.normalize`).
"""
