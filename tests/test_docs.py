"""The documentation: the site builds with no warning, the README stays short and starts with the
commands CI runs, and every headline figure names a command that exists, in both places it is shown."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO


def headline_rows(path) -> list[list[str]]:
    text = path.read_text()
    start = text.index("| question |")
    rows = [r for r in text[start:].split("\n\n", 1)[0].splitlines()[2:]]
    return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs and mkdocstrings must be installed under CI: pip install -e '.[docs]'")
        pytest.skip("the docs extra is not installed: pip install -e '.[docs]'")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    for page in ("index.html", "getting-started/index.html", "guides/import/index.html", "api/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "tinysaver.stageplan.resolve" in api and "StagePlan" in api  # the reference was generated
    # what a reader sees: lists that render as lists, no raw Sphinx roles, nothing fetched from elsewhere
    pages = {p.relative_to(tmp_path / "site"): p.read_text() for p in (tmp_path / "site").rglob("*.html")
             if "404" not in p.name}
    for page, html in pages.items():
        text = re.sub(r"<(pre|code)\b.*?</\1>", "", html, flags=re.S)
        as_text = [p for p in re.findall(r"<p>(.*?)</p>", text, flags=re.S) if re.search(r"(^|\n)\s*- ", p)]
        assert not as_text, (page, as_text[0][:200])  # a list written without its blank line: "- " in a paragraph
        assert not re.search(r":(meth|class|func):`", text), (page, re.search(r".{40}:(meth|class|func):`.{40}", text))
        foreign = [u for u in re.findall(r'(?:src|href)="(https?://[^"]+)"', html)
                   if "127.0.0.1" not in u and "localhost" not in u and not u.startswith("https://squidfunk")]
        assert not [u for u in foreign if re.search(r"\.(js|css|woff2?)(\?|$)", u)], (page, foreign[:3])
    serve = pages[next(p for p in pages if str(p) == "guides/serve/index.html")]
    assert serve.count("<li>") >= 10  # the serve guide's lists are lists
    # a results page leads with its answer; the runs behind it are folded, one per run
    for page, html in pages.items():
        if str(page).startswith("results/") and str(page) != "results/index.html":
            body = html[html.index("<h1"):]
            lead = body[:body.index('id="the-runs"')]
            assert "<strong>Question.</strong>" in lead and "<strong>Answer.</strong>" in lead, page
            assert "<img" in lead and "<table>" in lead, page
            runs = body[body.index('id="the-runs"'):]
            assert runs.count("<h3") == runs.count("<details") > 0, page


def test_the_readme_is_short_and_starts_with_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert "tinysaver query" in blocks[0] and "pytest" in blocks[1]
    ci = (REPO / ".ci" / "run").read_text()
    # CI runs the second command (quieter): the same steps, package set and test run
    assert blocks[1].replace(" -y ", " -y -qq ").replace("pip install ", "pip install -q ") \
        .replace("apt-get update ", "apt-get update -qq ") in ci
    for link in re.findall(r"\]\(([^)#]+)", readme):
        assert (REPO / link).exists(), link


def test_results_index_matches_the_site_and_each_command_exists():
    from tinysaver.cli.main import build_parser

    site = headline_rows(REPO / "docs" / "results" / "index.md")
    index = headline_rows(REPO / "benchmarks" / "RESULTS.md")
    assert len(site) >= 6 and [r[:3] for r in site] == [r[:3] for r in index]
    for s, i in zip(site, index):
        assert i[3] == s[3].replace("](", "](../docs/results/")
        page = re.search(r"\]\(([^)#]+)", s[3]).group(1)
        assert (REPO / "docs" / "results" / page).is_file(), page
    parser = build_parser()
    for *_, command, page in site:
        cmd = shlex.split(command.strip("`"))
        if cmd[0] == "tinysaver":
            parser.parse_args(cmd[1:])  # a renamed option fails here
            continue
        assert cmd[:1] == ["python"], command
        script = REPO / cmd[1]
        assert script.is_file(), script
        source = script.read_text()
        if "from common import" in source:  # the options every benchmark shares are declared there
            source += (REPO / "benchmarks" / "common.py").read_text()
        for flag in (a for a in cmd[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script.name} has no {flag}"
        page_text = (REPO / "docs" / "results" / re.search(r"\]\(([^)#]+)", page).group(1)).read_text()
        assert cmd[1] in page_text  # the page holds that run


def test_the_docs_name_no_issue_numbers():
    """A reader of the site never saw the tracker: results say what was asked, not which ticket asked it."""
    for page in (REPO / "docs").rglob("*.md"):
        found = re.search(r"\b[Ii]ssue[ -]?#?\d+", page.read_text())
        assert not found, (page, found.group(0))


def test_the_api_reference_lists_exactly_the_public_names():
    """docs/api.md documents each name of ``tinysaver.__all__`` once, at the object the package
    exports; a module's entry (the errors) documents that module's ``__all__``."""
    import importlib
    import inspect

    import tinysaver

    documented = {}
    for e in re.findall(r"^::: ([\w.]+)$", (REPO / "docs" / "api.md").read_text(), re.M):
        module, _, name = e.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        for n, o in ({n: getattr(obj, n) for n in obj.__all__} if inspect.ismodule(obj) else {name: obj}).items():
            assert n not in documented, f"{n} is documented twice"
            documented[n] = o
    assert sorted(documented) == sorted(tinysaver.__all__)
    assert all(getattr(tinysaver, n) is obj for n, obj in documented.items())
