"""Tests of ucm.eval.models: the tiny random Llama and the SmolLM2 conversion, run through transformers and vLLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ucm.errors import UcmConfigError
from ucm.eval.models import make_tiny_llama, smollm2_gguf_path, smollm2_is_converted


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_tiny_llama_is_deterministic_and_reused(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=3)
    b = make_tiny_llama(tmp_path / "b", seed=3)
    c = make_tiny_llama(tmp_path / "c", seed=4)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert ta.keys() == tb.keys() and len(ta) == 2 * 9 + 3  # 9 tensors per layer + embed, norm, lm_head
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.layers.0.self_attn.q_proj.weight"], tc["model.layers.0.self_attn.q_proj.weight"])
    cfg = json.loads((Path(a) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 64 and cfg["num_key_value_heads"] == 2
    # Same spec again: the folder is reused, not rewritten.
    mtime = (Path(a) / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_llama(tmp_path / "a", seed=3) == a
    assert (Path(a) / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": 250}, "hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_tiny_llama_rejects_bad_shapes(tmp_path, kwargs, field):
    with pytest.raises(UcmConfigError) as err:
        make_tiny_llama(tmp_path / "m", **kwargs)
    assert err.value.field == field
    assert not (tmp_path / "m").exists()


def _run_tiny_in_vllm(path: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        max_model_len=2048,
        kv_cache_memory_bytes=32 << 20,
        enforce_eager=True,
        max_num_seqs=4,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=8, detokenize=False)
    prompts = [{"prompt_token_ids": list(range(5, 5 + 300))}, {"prompt_token_ids": list(range(5, 5 + 300))}]
    outs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    return [list(o.outputs[0].token_ids) for o in outs]


def test_tiny_llama_runs_in_vllm(tmp_path):
    path = make_tiny_llama(tmp_path / "tiny", vocab_size=1024)
    outs = _run_tiny_in_vllm(path)
    assert len(outs) == 2 and all(len(o) == 8 for o in outs)
    assert all(0 <= t < 1024 for t in outs[0])
    assert outs[0] == outs[1]  # greedy: same prompt, same tokens
    assert len(set(outs[0])) > 1  # weights are not degenerate (a constant model would repeat one token)


def test_smollm2_conversion_matches_the_gguf_model(smollm2_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert smollm2_is_converted(smollm2_path)
    cfg = AutoConfig.from_pretrained(smollm2_path)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # A mis-dequantized or mis-permuted checkpoint cannot copy a 5-digit key out of its context.
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 4
    needle = "The pass key is 40719. Remember it. 40719 is the pass key. "
    prompt = f"{filler}{needle}{filler}What is the pass key? The pass key is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "40719" in tok.decode(out[0, ids.shape[1] :])


def test_smollm2_marker_decides_reuse(smollm2_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smollm2_path, copy)
    assert smollm2_is_converted(copy)
    marker = copy / ".ucm-complete.json"
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "gguf_sha256": "0" * 64}))  # converted from another file
    assert not smollm2_is_converted(copy)
    marker.unlink()  # a conversion killed before it finished
    assert not smollm2_is_converted(copy)
    assert smollm2_gguf_path().name.endswith(".gguf")
