"""The docs-snippet runner (:mod:`der_sdk.testing.snippets`) that keeps pages of commands
true: it runs console and bash blocks in order, writes file blocks, carries exports and the
folder over, honours the directives, and says which line of which page failed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from der_sdk.testing.snippets import SnippetFailed, SnippetRunner, parse_snippets

PAGE = """\
# A page

<!-- docs-test: file conf/settings.txt -->
```text
port=5020
```

```console
$ export GREETING=$(echo hello)
$ mkdir -p work && cd work
$ test "$GREETING" = hello && test "$(basename "$PWD")" = work
some output that is not checked
$ grep -q port=6000 ../conf/settings.txt
```

<!-- docs-test: exit 3 -->
```console
$ exit 3
```

<!-- docs-test: background -->
```console
$ sh -c 'sleep 0.3; touch ready; sleep 60'
```

<!-- docs-test: retry 10; contains ready -->
```console
$ ls
```

<!-- docs-test: skip needs a real inverter -->
```console
$ false
```

```bash
echo one \\
  two > joined.txt
```

```python
print("python blocks are not run")
```
"""


def run(tmp_path: Path, text: str) -> SnippetRunner:
    page = tmp_path / "page.md"
    page.write_text(text)
    work = tmp_path / "work-root"
    work.mkdir()
    runner = SnippetRunner(page, work, env=dict(os.environ), replace={"5020": "6000"})
    with runner:
        runner.run()
    return runner


def test_blocks_run_in_order_with_exports_folders_files_and_directives(tmp_path: Path) -> None:
    runner = run(tmp_path, PAGE)
    assert runner.skipped == [("page.md:32", "needs a real inverter")]
    assert (tmp_path / "work-root" / "conf" / "settings.txt").read_text() == "port=6000\n"
    assert (tmp_path / "work-root" / "work" / "joined.txt").read_text() == "one two\n"
    assert len(runner.ran) == 9


def test_continuation_lines_make_one_command(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```console\n$ echo a \\\n  b\nout\n$ true\n```\n")
    assert parse_snippets(page)[0].commands == ["echo a \\\n  b", "true"]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("```console\n$ echo nope; exit 2\n```\n", "page.md:1: `echo nope; exit 2` exited 2"),
        (
            "<!-- docs-test: contains PASS -->\n```console\n$ echo FAIL\n```\n",
            "page.md:2: `echo FAIL` its output does not contain 'PASS'",
        ),
    ],
)
def test_a_failing_command_names_the_page_line_and_shows_the_output(
    tmp_path: Path, block: str, message: str
) -> None:
    with pytest.raises(SnippetFailed) as failed:
        run(tmp_path, block)
    assert str(failed.value).startswith(message)
    assert "nope" in str(failed.value) or "FAIL" in str(failed.value)


def test_unknown_directives_and_skips_without_a_reason_are_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: retyr 5 -->\n```console\n$ true\n```\n")
    with pytest.raises(ValueError, match=r"page\.md:2: unknown docs-test directive 'retyr'"):
        parse_snippets(page)
    page.write_text("<!-- docs-test: skip -->\n```console\n$ true\n```\n")
    with pytest.raises(ValueError, match="skip needs a reason"):
        parse_snippets(page)


def test_background_processes_are_stopped_when_the_runner_closes(tmp_path: Path) -> None:
    page = (
        "<!-- docs-test: background -->\n```console\n$ sh -c 'echo $$ > pid; exec sleep 600'\n```\n"
    )
    page += "<!-- docs-test: retry 10 -->\n```console\n$ test -s pid\n```\n"
    run(tmp_path, page)
    pid = int((tmp_path / "work-root" / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
