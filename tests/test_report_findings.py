"""Specification of how the report sorts findings: by kind and severity, one line per cause."""

from __future__ import annotations

import pytest

from harness.report.findings import FindingKind, classify_finding, group_findings

CRASH = (
    "flash-mini/short prefill: llamacpp worker died (exit -6) while prefill\n"
    "--- key lines of its stderr ---\n"
    "/src/ggml.c:1234: GGML_ASSERT(ne0 % 32 == 0) failed\n"
    "--- last 3 lines of its stderr ---\n"
    "llama_context: n_ctx = 64\n"
    "#0 0x7f ggml_abort\n"
    "#1 0x7f ggml_mul_mat"
)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        # pytest plugin: a crash of the port under test, with its stderr
        (CRASH, FindingKind.PORT_FAILURE),
        ("ling3-mini/short decode: mlx[float32] crashed in decode: ValueError: bad shape "
         "(bailing_hybrid.py:88)", FindingKind.PORT_FAILURE),
        ("mlx[float32] MTP on flash-mini/short: called sys.exit(3) (port.py:12)",
         FindingKind.PORT_FAILURE),
        # MTP disagreements
        ("llamacpp on mtp-agree/short: drafts or acceptance differ from the reference "
         "(10/20 vs 12/20 accepted)", FindingKind.DISAGREEMENT),
        ("mlx on flash-mini/short: speculative decoding changed the greedy output "
         "(a verification or cache-rollback bug)", FindingKind.DISAGREEMENT),
        ("llamacpp on mtp-agree/short: the MTP head first differs from the reference's at "
         "mtp_hnorm (teacher-forced on the prompt)", FindingKind.DISAGREEMENT),
        # checkpoint normalisations: the pytest plugin's and the converter's
        ("Ling 3.0 checkpoint normalised: config key num_experts_per_tok renamed",
         FindingKind.NORMALISATION),
        ("no score_function in config.json: the converter then writes no "
         "bailingmoe3.expert_gating_func and llama.cpp refuses the GGUF ('key not found'); "
         "transformers' BailingHybridTopkRouter is sigmoid: staged score_function='sigmoid'",
         FindingKind.NORMALISATION),
        # skips: a backend missing, an architecture the port lacks
        ("llamacpp skipped: libllama failed to load (libggml.so missing)", FindingKind.SKIP),
        ("llamacpp on flash-mini: architecture not supported by this build: libllama refuses "
         "GGUF architecture 'bailing_hybrid'", FindingKind.SKIP),
        ("mlx not run: mlx is not installed", FindingKind.SKIP),
        # results, not findings
        ("greedy: 64/64 tokens identical", FindingKind.INFO),
        ("mlx: MTP acceptance rate 0.75, mean acceptance length 2.5", FindingKind.INFO),
        # anything else is kept, as a note
        ("GGUF given by the user, converted elsewhere: /tmp/x.gguf", FindingKind.NOTE),
    ],
)
def test_each_producer_wording_is_filed_under_its_kind(text: str, kind: FindingKind) -> None:
    assert classify_finding(text) is kind


def test_a_crash_in_unknown_words_is_a_port_failure_when_a_check_errored_with_it() -> None:
    text = "flash-mini/short prefill: my_port returned garbage"
    assert classify_finding(text) is FindingKind.NOTE
    details = ["port failure: my_port returned garbage"]
    assert classify_finding(text, error_details=details) is FindingKind.PORT_FAILURE


def test_a_port_failure_is_one_cause_line_with_its_stderr_kept_apart() -> None:
    (group,) = group_findings([CRASH])
    (finding,) = group.findings
    assert finding.cause == ("llamacpp worker died (exit -6) while prefill — "
                             "/src/ggml.c:1234: GGML_ASSERT(ne0 % 32 == 0) failed")
    assert finding.raw == CRASH.split("\n", 1)[1]
    assert finding.seen_in == ["flash-mini/short prefill"]


def test_the_same_crash_in_several_modes_is_one_finding_seen_in_each() -> None:
    decode = CRASH.replace("short prefill:", "short decode:").replace("while prefill",
                                                                      "while decode")
    (group,) = group_findings([CRASH, decode, CRASH])
    (finding,) = group.findings
    assert finding.seen_in == ["flash-mini/short prefill", "flash-mini/short decode"]


def test_groups_come_in_order_of_severity_and_only_normalisations_and_results_collapse() -> None:
    groups = group_findings([
        "greedy: 64/64 tokens identical",
        "llamacpp skipped: no libllama",
        "Ling 3.0 checkpoint normalised: renamed a key",
        "something the harness noticed",
        "mlx on c/p: drafts or acceptance differ from the reference (1/2 vs 2/2 accepted)",
        CRASH,
    ])
    assert [g.kind for g in groups] == list(FindingKind)
    assert [g.severity for g in groups] == ["error", "error", "warning", "info", "info", "info"]
    assert [g.collapsed for g in groups] == [False, False, False, True, False, True]


def test_exact_duplicates_are_listed_once() -> None:
    (group,) = group_findings(["llamacpp skipped: no libllama"] * 3)
    assert [f.cause for f in group.findings] == ["llamacpp skipped: no libllama"]
