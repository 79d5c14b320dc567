"""The manual's examples run as written: every `dipstream ...` command in the bash blocks of the
README and the guide parses with the command line (its subcommand exists, its flags exist, its
values are of their types and among their choices), and the quick ones run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dipstream.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]


def examples() -> list[tuple[str, str]]:
    """(file name, command line) of every `dipstream` command in the docs' bash blocks, with
    backslash continuations joined and comments dropped."""
    out = []
    for path in DOCS:
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words and words[0] == "dipstream":
                        out.append((path.name, " ".join(shlex.quote(w) for w in words)))
    return out


EXAMPLES = examples()
# the Python API's examples (they start `import dipstream`; the other blocks are fragments)
PYTHON = [b for path in DOCS for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
          if b.startswith("import dipstream\n")]


def test_the_docs_have_examples():
    assert len(EXAMPLES) > 30
    assert {c.split()[1] for _, c in EXAMPLES} >= {"eval", "simulate", "finetune", "sweep", "report", "lm-eval",
                                                   "generate", "export", "probe", "models", "methods",
                                                   "serve", "chat"}
    assert len(PYTHON) >= 2


@pytest.mark.parametrize("where,command", EXAMPLES, ids=[c[:60] for _, c in EXAMPLES])
def test_every_example_parses(where, command, capsys):
    words = [w for w in shlex.split(command)[1:] if w != "..."]  # "..." stands for the rest of a command
    try:
        ns = build_parser(words[0]).parse_args(words)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert ns.command == words[0]


@pytest.mark.parametrize("command", ["models", "methods"])
def test_the_quick_examples_run(command, capsys):
    assert main([command]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.real
@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_the_python_examples_run(code, capsys):
    exec(compile(code, "docs/guide.md", "exec"), {"__name__": "guide"})
    assert capsys.readouterr().out.strip()
