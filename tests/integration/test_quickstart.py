"""The README's quick start, command by command, from an empty folder outside the checkout:
your own Markdown/text files to an index, a search, an answer, a chat, a server and an eval."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
MARK = "@@@ "


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, "the README is the front page; the manual goes in docs/"
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```\n<!-- /quickstart -->", text, re.DOTALL)
    assert block, "README.md lost its quick start block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _left_over(folder: Path) -> list[psutil.Process]:
    """Processes still running a command of this quick start (they would be orphans by now)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "notes-index" in " ".join(p.info["cmdline"] or []) and p.cwd() == str(folder.resolve()):
                found.append(p)
    return found


def test_readme_quick_start_runs_from_an_empty_folder(tmp_path: Path) -> None:
    lines = quickstart_lines()
    assert lines[0].startswith("source ") and lines[0].endswith("/.venv/bin/activate")
    assert not tmp_path.resolve().is_relative_to(ROOT)  # outside the checkout
    script = ["set -euo pipefail", f"source {shlex.quote(str(Path(sys.executable).parent / 'activate'))}"]
    for line in lines[1:]:
        script += [f"echo {shlex.quote(MARK + line)}", line]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    try:
        r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900, env=env)
    finally:
        left = _left_over(tmp_path)
        for p in left:
            p.kill()
    assert not left, f"still running after the quick start: {[p.info['cmdline'] for p in left]}"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = {}
    for part in r.stdout.split(MARK)[1:]:
        cmd, _, text = part.partition("\n")
        sub = re.search(r"\brag (\w+)", cmd)  # a rag command by its name, anything else by its program
        out[sub.group(1) if sub else cmd.split()[0]] = text
    assert json.loads(out["index"])["passages"] == 2
    assert out["search"].splitlines()[0].split("(")[-1].startswith("coffee.txt")  # the espresso note first
    assert out["ask"].strip() and "[1]" in out["ask"]  # an answer and its citations
    assert "rag> " in out["chat"] and "coffee.txt" in out["chat"]  # a streamed turn, then /sources
    reply = json.loads(out["curl"].strip().splitlines()[-1])
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
    assert (tmp_path / "notes-eval" / "report.md").is_file() and "default" in out["eval"]
