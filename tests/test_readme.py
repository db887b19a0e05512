"""The README runs: every Python snippet executes, every command names a real entry point
and only flags (and config fields) that entry point accepts, and every link to a file in
the repository resolves."""

import importlib
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONSOLE_SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _blocks(language: str) -> list[tuple[int, str]]:
  """(line number, text) of every fenced block in `language`."""
  return [(README[:match.start()].count("\n") + 2, match.group(1))
          for match in re.finditer(rf"```{language}\n(.*?)```", README, re.S)]


def _commands() -> list[list[str]]:
  """The README's bash commands, continuation lines joined, comments dropped."""
  commands = []
  for _, block in _blocks("bash"):
    for command in block.replace("\\\n", " ").splitlines():
      words = shlex.split(command, comments=True)
      if words:
        commands.append(words)
  return commands


@pytest.mark.parametrize("line,snippet", _blocks("python"), ids=lambda v: str(v)[:12])
def test_python_snippet_runs(line, snippet):
  exec(compile(snippet, f"README.md:{line}", "exec"), {})


def _help_text(words: list[str]) -> str:
  if words[0] in CONSOLE_SCRIPTS:
    module = CONSOLE_SCRIPTS[words[0]].split(":")[0]
  elif words[:2] == ["python", "-m"]:
    module = words[2]
  else:
    raise AssertionError(f"unknown entry point: {' '.join(words)}")
  result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def _config_field_exists(config_file: str, field: str) -> bool:
  path, _, argument = config_file.partition(":")
  spec = importlib.util.spec_from_file_location("readme_config", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  node = module.get_config(argument) if argument else module.get_config()
  for part in field.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


def test_every_command_uses_real_entry_points_flags_and_config_fields():
  commands = _commands()
  assert commands, "the README has no commands"
  makefile = (ROOT / "Makefile").read_text()
  train_flags = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', (ROOT / "train.py").read_text()))
  helps = {}
  for words in commands:
    if words[0] == "make":
      assert re.search(rf"^{words[1]}:", makefile, re.M), words
      continue
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    if words[:2] == ["python", "train.py"]:
      config_file = words[words.index("--config") + 1]
      for flag in flags:
        if flag.startswith("--config."):
          assert _config_field_exists(config_file, flag[len("--config."):]), (flag, words)
        else:
          assert flag[2:] in train_flags, (flag, words)
      continue
    key = tuple(words[:3] if words[0] == "python" else words[:1])
    helps.setdefault(key, _help_text(words))
    for flag in flags:
      assert flag in helps[key], (flag, words)


def test_console_scripts_point_at_cli_mains():
  assert set(CONSOLE_SCRIPTS) >= {"a2u-predict", "a2u-evaluate", "a2u-convert"}
  for target in CONSOLE_SCRIPTS.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_links_and_design_references_resolve():
  for document in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document.read_text()):
      if not target.startswith("http"):
        assert (document.parent / target).exists(), (document, target)
  # Docstrings cite "docs/design.md §N"; every such section exists.
  sections = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md")
                            .read_text(), re.M))
  cited = set()
  for path in ROOT.glob("**/*.py"):
    if ".venv" not in path.parts:
      cited |= set(re.findall(r"design\.md §(\d+(?:\.\d+)?)", path.read_text()))
  assert cited and cited <= sections, cited - sections
