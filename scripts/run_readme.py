"""Run every command of README.md as written, in order, in one bash session, and report each.

    python scripts/run_readme.py --skip 'scripts/test\\.sh' --report readme-run.md

Run it from a clone: the commands write into it (`logs/`, `.cache/data/`, `exported/`, ...).
The session first sources `scripts/env.sh`, as the README tells a user to, so `python` is the
project environment's. Commands come from the ```bash blocks (one per line; variables such as
`RUN=` carry over to later lines), the ```console blocks (each `$ command`; the lines after it are
its expected output, `...` standing for any text) and the ```python blocks (run whole, by
`python -`). A README command that reads a file of the user's, `clip.mp4`, gets a short video of
the embedded dataset's images as a stand-in; nothing else is provided, so commands that need a
GPU, SLURM, ImageNet or DeepMind's weights must be refused in one line, and the report shows it.

The report is a Markdown table: README line, command, exit status, seconds, and the last line of
its output (or whether a console block's expected output matched).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
BOX_DRAWING = set("━│┃└┘┌┐┏┓┗┛┡┩╇┳┻╋─├┤┬┴┼")


@dataclass
class Command:
    line: int  # where it is in the README, 1-based
    text: str  # bash source, as written
    expected: list[str] = field(default_factory=list)  # a console block's expected output


def readme_commands(markdown: str) -> list[Command]:
    commands: list[Command] = []
    language, block, start = None, [], 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and language is None:
            language, block, start = fence.group(1), [], number + 1
        elif fence or line.startswith("```"):
            commands.extend(_block_commands(language, block, start))
            language = None
        elif language is not None:
            block.append(line)
    return commands


def _block_commands(language: str, lines: list[str], start: int) -> list[Command]:
    if language == "bash":
        return [Command(start + i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if language == "console":
        commands = []
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                commands.append(Command(start + i, line[2:].strip()))
            elif commands and line.strip():
                commands[-1].expected.append(line)
        return commands
    if language == "python":
        return [Command(start, "python - <<'PY'\n" + "\n".join(lines) + "\nPY")]
    return []


def matches(expected: str, actual: str) -> bool:
    """A console line as printed in the README, where `...` stands for any text."""
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual) is not None


def video_stand_in(path: Path) -> None:
    """`clip.mp4` for the README's video example: 30 frames of the embedded dataset's val images."""
    import cv2  # the `video` extra, which the README's video command needs anyway

    images = sorted((ROOT / ".cache" / "data").glob("shapes-*/val/*/0000[0-2].png"))
    if not images:
        raise SystemExit("no embedded dataset under .cache/data yet: the README's training commands make it")
    first = cv2.imread(str(images[0]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, first.shape[1::-1])
    for image in images[:30]:
        writer.write(cv2.imread(str(image)))
    writer.release()


def session_script(commands: list[Command], log_dir: Path, video_helper: str) -> str:
    parts = ["source scripts/env.sh || exit 1"]
    for index, command in enumerate(commands):
        if "clip.mp4" in command.text:
            parts.append(f"[ -f clip.mp4 ] || python {video_helper} --video-stand-in clip.mp4")
        parts.append(
            f"echo '[readme] {index}: line {command.line}' >&2\n"
            "_start=$EPOCHREALTIME\n"
            f"{{\n{command.text}\n}} >{log_dir}/{index}.log 2>&1 </dev/null\n"
            f"echo \"{index} $? $_start $EPOCHREALTIME\" >>{log_dir}/status"
        )
    return "\n".join(parts) + "\n"


def report(commands: list[Command], log_dir: Path) -> tuple[str, bool]:
    rows = ["| line | command | exit | s | output (last line) |", "|---|---|---|---|---|"]
    expectations_met = True
    status = {}
    for entry in (log_dir / "status").read_text().splitlines():
        index, code, start, end = entry.split()
        status[int(index)] = (int(code), float(end) - float(start))
    for index, command in enumerate(commands):
        code, seconds = status[index]
        output = [line for line in (log_dir / f"{index}.log").read_text(errors="replace").splitlines() if line.strip()]
        last = next((line.strip() for line in reversed(output) if _is_text(line)), "")
        if command.expected:
            met = len(output) == len(command.expected) and all(map(matches, command.expected, output))
            expectations_met &= met
            last = ("as in the README: " if met else "DIFFERS from the README: ") + last
        # The first line, without its trailing comment: the table shows what was run.
        text = re.sub(r"\s+# .*$", "", command.text.splitlines()[0]) + (" ..." if "\n" in command.text else "")
        rows.append(f"| {command.line} | `{_cell(text, limit=400)}` | {code} | {seconds:.0f} | {_cell(last)} |")
    return "\n".join(rows) + "\n", expectations_met


def _is_text(line: str) -> bool:
    """Not part of Lightning's rich progress bar or tables: box drawing, or its metrics column
    (right-aligned far into the line)."""
    return not set(line) & BOX_DRAWING and len(line) - len(line.lstrip()) < 20


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--skip", help="regex: commands matching it are not run (e.g. the whole test suite)")
    parser.add_argument("--report", type=Path, default=Path("readme-run.md"), help="the Markdown table")
    parser.add_argument("--logs", type=Path, help="one log per command (default: a temporary folder)")
    parser.add_argument("--list", action="store_true", help="only print the commands")
    parser.add_argument("--video-stand-in", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.video_stand_in:
        video_stand_in(args.video_stand_in)
        return 0
    commands = [c for c in readme_commands(args.readme.read_text())
                if not (args.skip and re.search(args.skip, c.text))]
    if args.list:
        for command in commands:
            print(f"{command.line}: {command.text}")
        return 0
    log_dir = (args.logs or Path(tempfile.mkdtemp(prefix="readme-run-"))).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "status").write_text("")
    script = session_script(commands, log_dir, str(Path(__file__).resolve()))
    (log_dir / "session.sh").write_text(script)
    subprocess.run(["bash", str(log_dir / "session.sh")], cwd=ROOT, check=False)
    table, expectations_met = report(commands, log_dir)
    args.report.write_text(table)
    print(table)
    print(f"logs: {log_dir}", file=sys.stderr)
    return 0 if expectations_met else 1


if __name__ == "__main__":
    sys.exit(main())
