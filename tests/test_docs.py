"""The documentation: the README's two commands are CI's, the site builds with no broken link or
anchor (``mkdocs build --strict``), its figure tables come from the results files, and the CLI
reference is the parser's own ``--help``."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    app, tests = readme_commands()[:2]
    assert app == "pip install -r requirements.txt && streamlit run app.py"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == tests == "pip install -r requirements.txt && python -m pytest tests"
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (REPO / picture).is_file(), picture


def test_cli_reference_is_the_parsers_help():
    from engine.cli import ORDER
    from engine.cli.reference import PAGE, helps, markdown

    assert PAGE.read_text() == markdown(), "docs/cli.md is stale: run python -m engine.cli.reference"
    env = {**os.environ, "COLUMNS": "100"}
    for name in ("serve", "train"):  # two commands end to end: the text is what --help prints
        out = subprocess.run([sys.executable, "-m", "engine", name, "--help"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120).stdout
        assert out == helps()[name]
    assert set(ORDER) <= set(re.findall(r"^## (\w+)$", PAGE.read_text(), re.M))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=REPO,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_site_builds_strict_with_generated_figures(site):
    for page in ("getting-started", "dashboard", "own-images", "cli", "service", "scale-out", "security",
                 "performance", "architecture", "api"):
        assert (site / page / "index.html").is_file(), page
    generated = sorted((REPO / "docs" / "generated").glob("*.md"))
    assert len(generated) >= 8
    for g in generated:
        text = g.read_text()
        sources = re.findall(r"\*Source: `(bench/results/[^`]+)`, ([^,]+), ([^*]+)\.\*", text)
        assert sources or "No scale-out run yet" in text, g.name
        for path, date, _machine in sources:
            assert (REPO / path).is_file(), path
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}|not committed yet|date not recorded", date), date
    # every table the pages include is in the built site (a snippet that failed would abort the build)
    html = (site / "performance" / "index.html").read_text()
    assert "bench/results/pneumoniamnist.json" in html and "bench/results/breastmnist.json" in html
    assert "engine.serve.placement.Placement" in (site / "api" / "index.html").read_text()
