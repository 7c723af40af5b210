"""A docs page whose commands a test runs: a file block, an export, a background
service and a command that waits for it (docs/testing.md, "Docs pages")."""

import os
from pathlib import Path

from der_sdk.testing import SnippetRunner, free_port

PAGE = """\
Write the settings:

<!-- docs-test: file settings.env -->
~~~text
PORT=8000
~~~

Serve this folder, then fetch the settings back:

<!-- docs-test: background -->
~~~console
$ python3 -m http.server 8000 --bind 127.0.0.1
~~~

<!-- docs-test: retry 30; contains PORT= -->
~~~console
$ export URL=http://127.0.0.1:8000/settings.env
$ python3 -c "import urllib.request as u, os; print(u.urlopen(os.environ['URL']).read())"
~~~
""".replace("~~~", "`" * 3)  # the fences of the page, spelled so this file can be quoted


def test_the_page_runs_as_written(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    work = tmp_path / "work"
    work.mkdir()
    port = str(free_port())  # the page's fixed port, moved onto a free one
    with SnippetRunner(page, work, env=dict(os.environ), replace={"8000": port}) as runner:
        runner.run()
    assert runner.skipped == []
    assert (work / "settings.env").read_text() == f"PORT={port}\n"
