"""The command line both atheris harnesses share: seed an empty corpus, then fuzz.

`python tests/fuzz/atheris_NAME.py [libFuzzer options] [CORPUS_DIR...]` (`make fuzz` runs
them): an empty corpus directory gets the harness's seeds first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run(atheris: Any, seeds: list[bytes], test_one_input: Callable[[bytes], None]) -> None:
    if atheris is None:
        sys.exit("atheris is not installed: make fuzz installs it into .venv")
    corpus = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    for directory in corpus:
        if directory.is_dir() and not any(directory.iterdir()):
            for number, seed in enumerate(seeds):
                (directory / f"seed-{number}").write_bytes(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
