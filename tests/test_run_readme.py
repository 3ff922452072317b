"""scripts/run_readme.py, which runs the README's commands as written: what it takes from each
kind of block, and how a console block's expected output is compared."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_readme", ROOT / "scripts" / "run_readme.py")
run_readme = importlib.util.module_from_spec(_spec)
sys.modules["run_readme"] = run_readme  # its dataclasses look their module up
_spec.loader.exec_module(run_readme)

SAMPLE = """Intro.

```bash
RUN=$(ls -d logs/* | tail -n 1)   # a comment stays

python eval.py ckpt_path=$RUN/last.ckpt
```

```console
$ python train.py x=1
config error: x=1 is bad; choose one of: a, b, ...
$ python train.py y=2
```

```python
import nfnet
print(1)
```

```yaml
data: {root: /data}
```
"""


def test_each_kind_of_block():
    commands = run_readme.readme_commands(SAMPLE)
    assert [(c.line, c.text) for c in commands] == [
        (4, "RUN=$(ls -d logs/* | tail -n 1)   # a comment stays"),
        (6, "python eval.py ckpt_path=$RUN/last.ckpt"),
        (10, "python train.py x=1"),
        (12, "python train.py y=2"),
        (16, "python - <<'PY'\nimport nfnet\nprint(1)\nPY"),
    ]
    assert commands[2].expected == ["config error: x=1 is bad; choose one of: a, b, ..."]
    assert commands[3].expected == []


def test_ellipsis_stands_for_any_text_and_nothing_else_is_loose():
    expected = "config error: x=1 is bad; choose one of: a, b, ..."
    assert run_readme.matches(expected, "config error: x=1 is bad; choose one of: a, b, c, d")
    assert not run_readme.matches(expected, "config error: x=1 is bad; choose one of: a, c, d")
    assert run_readme.matches("(a+b) [x]", "(a+b) [x]")  # regex characters are literal
    assert not run_readme.matches("(a+b) [x]", "(aab) x")


def test_the_readme_yields_its_commands():
    commands = run_readme.readme_commands((ROOT / "README.md").read_text())
    texts = [c.text for c in commands]
    assert texts[0].startswith("bash scripts/train.sh") and texts[1].startswith("bash scripts/test.sh")
    assert sum(1 for c in commands if c.expected) >= 4  # the bad-override examples
    assert any(t.startswith("python - <<'PY'") and "onnxruntime" in t for t in texts)
    assert all(t.startswith(("python", "bash", "RUN=", "SHAPES=", "PREV=")) for t in texts)


def test_the_report_shows_the_command_without_its_comment_and_the_last_line_of_text(tmp_path):
    commands = run_readme.readme_commands(SAMPLE)[:3]
    (tmp_path / "status").write_text("0 0 10.0 10.5\n1 0 10.5 40.5\n2 2 40.5 43.0\n")
    (tmp_path / "0.log").write_text("")
    (tmp_path / "1.log").write_text("[INFO] - wrote eval.json\nTesting ━━━━━━━━ 4/4\n" + " " * 40 + "0.503\n")
    (tmp_path / "2.log").write_text("config error: x=1 is bad; choose one of: a, b, c\n")
    table, expectations_met = run_readme.report(commands, tmp_path)
    rows = table.splitlines()[2:]
    assert rows[0] == "| 4 | `RUN=$(ls -d logs/* \\| tail -n 1)` | 0 | 0 |  |"
    assert rows[1] == "| 6 | `python eval.py ckpt_path=$RUN/last.ckpt` | 0 | 30 | [INFO] - wrote eval.json |"
    assert rows[2].endswith("| 2 | 2 | as in the README: config error: x=1 is bad; choose one of: a, b, c |")
    assert expectations_met
