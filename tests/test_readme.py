"""The README is a front page (at most 250 lines) whose commands run as written: its Python example is
run here from the repository root, its make targets exist, and its links lead to files that exist."""
import re
import runpy
import subprocess

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250


def test_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (block,) = re.findall(r"```python\n(.*?)```", README, re.S)
    script = tmp_path / "example.py"
    script.write_text(block)
    monkeypatch.chdir(REPO)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "'0': (1, 256, 56, 56)" in out and "'masks': (" in out


def test_make_targets_exist():
    targets = set(re.findall(r"^make ([\w-]+)", README, re.M))
    assert targets >= {"demo", "test", "install"}
    for target in targets:
        assert subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True).returncode == 0, target


def test_links_lead_to_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links and [link for link in links if not (REPO / link).exists()] == []
