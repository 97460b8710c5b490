"""Tests of the harness's prompt grid (`ucm.eval.tasks`), settings (`ucm.eval.settings`), CLI parsing and
metrics (`ucm.eval.report`) with the real SmolLM2 tokenizer; no engine."""

from __future__ import annotations

import json
import os

import pytest

from ucm.errors import UcmConfigError
from ucm.eval.__main__ import _contexts, _depths, _run_argv, _tasks, _threads_bind
from ucm.eval.report import common_prefix, summarize, write_report
from ucm.eval.runner import run_key
from ucm.eval.settings import DEFAULT_SETTINGS, parse_setting, parse_settings
from ucm.eval.tasks import NEEDLE_SPAN_TOKENS, build_cases, default_depths


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_have_exact_length_and_hold_the_needle_at_its_depth(tokenizer, chat):
    depths = [0.0, 0.3, 0.7, 1.0]
    cases = build_cases(tokenizer, ["passkey", "needle"], [1024, 2048], depths, gen_tokens=32, use_chat_template=chat)
    assert len(cases) == 2 * 2 * 4
    for c in cases:
        assert len(c.prompt_token_ids) == c.context - 32
        text = tokenizer.decode(c.prompt_token_ids)
        assert text.count(c.answer) == (2 if c.task == "passkey" else 1)
        assert ("<|im_start|>" in text) == chat
        # The needle starts where the case says, and sits near its depth in the haystack.
        after = tokenizer.decode(c.prompt_token_ids[c.needle_token_pos : c.needle_token_pos + NEEDLE_SPAN_TOKENS])
        assert c.answer in after
        # the blocks a sparse selection must keep for the answer hold it
        blocks = c.needle_blocks(128)
        assert blocks[0] == c.needle_token_pos // 128
        assert c.answer in tokenizer.decode(c.prompt_token_ids[blocks[0] * 128 : (blocks[-1] + 1) * 128])
        rel = c.needle_token_pos / len(c.prompt_token_ids)
        assert abs(rel - c.depth) < 0.12, (c.case_id, rel)
    by_id = {c.case_id: c for c in cases}
    assert by_id["needle/2048/0.3000/0"].needle_token_pos < by_id["needle/2048/0.7000/0"].needle_token_pos
    # The haystack of the needle task is real essay text, not the passkey filler.
    assert "grass is green" not in tokenizer.decode(by_id["needle/2048/0.3000/0"].prompt_token_ids)


@pytest.mark.parametrize("chat", [False, True])
def test_ruler_style_tasks_hide_several_needles_and_ask_for_one_key(tokenizer, chat):
    depths = [0.0, 0.5, 1.0]
    cases = build_cases(tokenizer, ["multikey", "multivalue"], [2048], depths, gen_tokens=32, samples=2,
                        use_chat_template=chat)
    assert len(cases) == 2 * 3 * 2
    for c in cases:
        assert len(c.prompt_token_ids) == c.context - 32
        text = tokenizer.decode(c.prompt_token_ids)
        assert text.count("One of the special magic numbers for") == (4 if c.task == "multikey" else 3)
        values = c.answer.split("|")
        assert len(values) == (1 if c.task == "multikey" else 3)
        assert all(text.count(v) == 1 for v in values)
        # the asked needle starts where the case says, near its depth
        after = tokenizer.decode(c.prompt_token_ids[c.needle_token_pos : c.needle_token_pos + NEEDLE_SPAN_TOKENS])
        assert values[0] in after
        assert abs(c.needle_token_pos / len(c.prompt_token_ids) - c.depth) < 0.12, c.case_id
        # the question names the asked needle's city (a multikey prompt holds three other cities' numbers)
        city = after.split("magic numbers for ")[1].split(" is:")[0]
        assert f"for {city} mentioned in the provided text?" in text
        assert c.correct(" and ".join(values))
        assert c.correct(values[0]) == (len(values) == 1)  # one value of a multivalue needle is not the answer
    # multivalue: every value must be in the answer
    multi = next(c for c in cases if c.task == "multivalue")
    first, *rest = multi.answer.split("|")
    assert multi.correct(f"{first}, {rest[0]} and {rest[1]}.") and not multi.correct(f"{first} and {rest[0]}.")


def test_keys_depend_on_the_cell_not_on_the_grid(tokenizer):
    whole = build_cases(tokenizer, ["passkey", "needle"], [1024, 2048], [0.0, 0.5, 1.0], 32, seed=7)
    part = build_cases(tokenizer, ["needle"], [2048], [0.5], 32, seed=7)
    match = next(c for c in whole if c.case_id == part[0].case_id)
    assert match.prompt_token_ids == part[0].prompt_token_ids and match.prompt_digest == part[0].prompt_digest
    other_seed = build_cases(tokenizer, ["needle"], [2048], [0.5], 32, seed=8)
    assert other_seed[0].answer != part[0].answer
    assert len({c.answer for c in whole if c.task == "passkey"}) > 1


def test_bad_grid_is_a_typed_error(tokenizer):
    with pytest.raises(UcmConfigError) as err:
        build_cases(tokenizer, ["passkey"], [64], [0.5], 32)
    assert err.value.field == "context"
    with pytest.raises(UcmConfigError) as err:
        build_cases(tokenizer, ["passkey"], [1024], [1.5], 32)
    assert err.value.field == "depths"
    with pytest.raises(UcmConfigError) as err:
        build_cases(tokenizer, ["haystack"], [1024], [0.5], 32)
    assert err.value.field == "task"


def test_cli_parsing():
    assert _contexts("2K, 4k,8192") == [2048, 4096, 8192]
    assert _depths("11") == default_depths(11) and len(_depths("11")) == 11
    assert _depths("0,0.5,1") == [0.0, 0.5, 1.0]
    assert _tasks("needle,passkey") == ["needle", "passkey"]
    # The recorded command is the run's, also when the report is re-rendered with a note.
    assert _run_argv(["--contexts", "2K", "--report-only", "--note", "n.md", "--no-progress"]) == ["--contexts", "2K"]
    for fn, bad, field in ((_contexts, "2X", "contexts"), (_depths, "a,b", "depths"), (_tasks, "qa", "tasks")):
        with pytest.raises(UcmConfigError) as err:
            fn(bad)
        assert err.value.field == field


def test_cpu_thread_binding_is_pinned_and_part_of_the_run_key():
    cores = sorted(os.sched_getaffinity(0))
    assert _threads_bind("all") == ",".join(map(str, cores))
    assert _threads_bind("auto") is None
    assert _threads_bind("0-1,3") == "0-1,3"
    with pytest.raises(UcmConfigError, match="cpu-threads-bind"):
        _threads_bind("two cores")
    engine = {"model": "m", "block_size": 128}
    one, two = ({"VLLM_CPU_OMP_THREADS_BIND": v} for v in ("0", "0,1"))
    assert run_key(engine, {}, 32, one) != run_key(engine, {}, 32, two)  # thread count changes bf16 numerics
    assert run_key(engine, {}, 32, one) == run_key(engine, {}, 32, dict(one))


def test_settings_parse_and_build_the_connector_config():
    settings = parse_settings(",".join(reversed(DEFAULT_SETTINGS)))
    assert [s.name for s in settings][0] == "full" and len(settings) == 7
    esa = parse_setting("esa-r0.20-s10")
    assert esa.name == "esa-r0.2-s10" and esa.sparse_ratio == 0.2 and esa.retrieval_stride == 10
    extra = esa.extra_config(1 << 30, {"min_blocks": 8})
    assert extra["ucm_sparse_method"] == "ESA" and extra["ucm_connector_name"] == "UcmDram"
    assert extra["ucm_sparse_config"]["ESA"] == {"min_blocks": 8, "sparse_ratio": 0.2, "retrieval_stride": 10,
                                                 "initial_selection": "representations"}  # the name says it all
    assert parse_setting("full").kv_transfer_config(1 << 30) is None
    dense = parse_setting("dense-ucm").kv_transfer_config(1 << 30)
    assert dense.kv_connector == "UnifiedCacheConnectorV1"
    assert "ucm_sparse_method" not in dense.kv_connector_extra_config
    ucm_repr = parse_setting("esa-r0.2-s10-t128")
    assert ucm_repr.name == "esa-r0.2-s10-t128"
    assert ucm_repr.extra_config(1 << 30)["ucm_sparse_config"]["ESA"]["repr_tokens"] == 128
    by_attention = parse_setting("esa-r0.2-s10-a8")
    assert by_attention.name == "esa-r0.2-s10-a8"
    esa = by_attention.extra_config(1 << 30)["ucm_sparse_config"]["ESA"]
    assert esa["initial_selection"] == "attention" and esa["initial_queries"] == 8
    assert parse_setting("esa-r0.2-s10-t128-a4").name == "esa-r0.2-s10-t128-a4"
    for bad in ("esa", "esa-r0-s10", "esa-r1.5-s1", "esa-r0.2-s0", "sparse", "esa-r0.2-s10-t0", "esa-r0.2-s10-t",
                "esa-r0.2-s10-a0", "esa-r0.2-s10-a8-t16"):
        with pytest.raises(UcmConfigError) as err:
            parse_setting(bad)
        assert err.value.field == "settings"


def _row(setting, case, tokens, correct, connector=None):
    return {
        "kind": "case",
        "setting": setting,
        **case.describe(),
        "output_token_ids": tokens,
        "text": case.answer if correct else "no",
        "correct": correct,
        "wall_s": 1.0,
        "connector": connector or {},
    }


def test_summary_metrics_and_report_files(tokenizer, tmp_path):
    cases = build_cases(tokenizer, ["passkey"], [1024], [0.0, 0.5, 1.0], gen_tokens=4)
    a, b, c = cases
    sparse_stats = {"resident_block_steps": 3.0, "full_block_steps": 10.0, "sparse_requests": 1, "sparse_steps": 4}
    rows = [
        _row("full", a, [1, 2, 3, 4], True),
        _row("full", b, [1, 2, 3, 4], True),
        _row("full", c, [5, 6, 7, 8], False),
        _row("esa-r0.2-s10", a, [1, 2, 3, 4], True, sparse_stats),
        _row("esa-r0.2-s10", b, [1, 2, 9, 4], False, sparse_stats),  # diverges at token 2: prefix 2/4
        _row("esa-r0.2-s10", c, [5, 6, 7, 8], True, sparse_stats),  # gained an answer full misses
    ]
    summary = summarize(rows, ["full", "esa-r0.2-s10"], cases, gen_tokens=4)
    full, esa = summary["full"], summary["esa-r0.2-s10"]
    assert full["accuracy"] == round(2 / 3, 4) and full["complete"] and "kept_vs_full" not in full
    assert esa["kept_vs_full"] == 0.5
    assert esa["token_agreement_prefix"] == round((1 + 0.5 + 1) / 3, 4)
    assert esa["token_agreement_positional"] == round((1 + 0.75 + 1) / 3, 4)
    assert esa["identical_outputs"] == round(2 / 3, 4)
    assert esa["resident_share"] == 0.3 and (esa["sparse_requests"], esa["sparse_steps"]) == (3, 12)
    assert [m["case_id"] for m in esa["missed_vs_full"]] == [b.case_id]
    assert esa["gained_vs_full"] == [c.case_id]
    assert esa["grid"]["passkey"]["1024"] == {"0.0000": 1.0, "0.5000": 0.0, "1.0000": 1.0}
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    meta = {"title": "t", "command": "python -m ucm.eval", "model": "m", "engine": "e", "grid": "g", "notes": "n"}
    paths = write_report(tmp_path, "acc", meta, summary, rows)
    assert {p.name for p in paths} == {"acc.json", "acc.md", "acc_full.png", "acc_esa-r0.2-s10.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    md = (tmp_path / "acc.md").read_text()
    assert b.case_id in md and "| esa-r0.2-s10 |" in md
    assert json.loads((tmp_path / "acc.json").read_text())["settings"]["esa-r0.2-s10"]["kept_vs_full"] == 0.5
