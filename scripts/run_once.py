"""For the table scripts: run one `dipstream` command with `--json OUT` unless OUT exists (the
command writes it atomically, so a killed script resumes where it stopped); return its row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def dipstream_json(args: list[str], out: Path) -> dict:
    """The results row of `dipstream *args --json out`, running it only when `out` is missing."""
    if not out.exists():
        cmd = [sys.executable, "-m", "dipstream.cli.main", *args, "--json", str(out)]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())
