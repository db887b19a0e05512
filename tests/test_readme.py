"""The README and the manual in docs/ run: every Python snippet executes, every command
(theirs and benchmarks/README.md's) names a real entry point and only flags (and config
fields) that entry point accepts, every link to a file in the repository resolves, and
the README stays a map that links every page of the manual."""

import importlib
import json
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks" / "README.md"
MANUAL = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *MANUAL]
CONSOLE_SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _blocks(language: str, documents: list[pathlib.Path]) -> list[tuple[str, str]]:
  """("FILE:LINE", text) of every fenced block in `language` of `documents`."""
  blocks = []
  for document in documents:
    text = document.read_text()
    for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
      where = f"{document.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 2}"
      blocks.append((where, match.group(1)))
  return blocks


def _commands(documents: list[pathlib.Path]) -> list[tuple[str, list[str]]]:
  """(where, words) of the documents' bash commands, continuation lines joined, comments
  dropped."""
  commands = []
  for where, block in _blocks("bash", documents):
    for command in block.replace("\\\n", " ").splitlines():
      words = shlex.split(command, comments=True)
      if words:
        commands.append((where, words))
  return commands


@pytest.mark.parametrize("where,snippet", _blocks("python", DOCUMENTS),
                         ids=[where for where, _ in _blocks("python", DOCUMENTS)])
def test_python_snippet_runs(where, snippet):
  exec(compile(snippet, where, "exec"), {})


def _help_command(words: list[str]) -> list[str]:
  """The arguments after `python` that print `words`' entry point's help."""
  if words[0] in CONSOLE_SCRIPTS:
    return ["-m", CONSOLE_SCRIPTS[words[0]].split(":")[0], "--help"]
  if words[:2] == ["python", "-m"]:
    return ["-m", words[2], "--help"]
  if words[0] == "python" and re.fullmatch(r"benchmarks/\w+\.py", words[1]):
    return [words[1], "--help"]
  raise AssertionError(f"unknown entry point: {' '.join(words)}")


# Runs each command as `python ARGS` would (runpy, as the interpreter does for a module or
# a script) in one interpreter, which imports JAX once for all of them; prints each help
# text with its exit status.
_HELP_RUNNER = """
import contextlib, io, json, os, runpy, sys
results = []
for arguments in json.loads(sys.argv[1]):
  out, path = io.StringIO(), list(sys.path)
  with contextlib.redirect_stdout(out):
    try:
      if arguments[0] == "-m":
        sys.argv = arguments[1:]
        runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
      else:
        sys.argv = list(arguments)
        sys.path.insert(0, os.path.dirname(os.path.abspath(arguments[0])))
        runpy.run_path(arguments[0], run_name="__main__")
      status = 0
    except SystemExit as exit:
      status = exit.code or 0
  sys.path[:] = path
  results.append([status, out.getvalue()])
print(json.dumps(results))
"""


def _help_texts(commands: list[list[str]]) -> list[str]:
  result = subprocess.run([sys.executable, "-c", _HELP_RUNNER, json.dumps(commands)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  texts = []
  for command, (status, text) in zip(commands, json.loads(result.stdout.splitlines()[-1])):
    assert status == 0 and "usage:" in text, (command, status, text, result.stderr[-2000:])
    texts.append(text)
  return texts


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
  commands = _commands(DOCUMENTS + [BENCHMARKS])
  assert {where.split(":")[0] for where, _ in commands} >= {"README.md", "docs/training.md"}
  makefile = (ROOT / "Makefile").read_text()
  train_flags = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', (ROOT / "train.py").read_text()))
  others = []
  for where, words in commands:
    if words[0] == "make":
      assert re.search(rf"^{words[1]}:", makefile, re.M), (where, words)
      continue
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    if words[:2] == ["python", "train.py"]:
      config_file = words[words.index("--config") + 1]
      for flag in flags:
        if flag.startswith("--config."):
          assert _config_field_exists(config_file, flag[len("--config."):]), (where, flag)
        else:
          assert flag[2:] in train_flags, (where, flag)
      continue
    others.append((where, _help_command(words), flags))
  unique = sorted({tuple(command) for _, command, _ in others})
  helps = dict(zip(unique, _help_texts([list(command) for command in unique])))
  assert len(helps) >= 6, helps.keys()  # the four console scripts and two benchmarks
  for where, command, flags in others:
    for flag in flags:
      assert flag in helps[tuple(command)], (where, flag)


def test_console_scripts_point_at_cli_mains():
  assert set(CONSOLE_SCRIPTS) >= {"a2u-predict", "a2u-evaluate", "a2u-convert", "a2u-export"}
  for target in CONSOLE_SCRIPTS.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function))


def _anchors(document: pathlib.Path) -> set[str]:
  """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped,
  spaces as hyphens."""
  headings = re.findall(r"^#+ (.+)$", document.read_text(), re.M)
  return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_and_design_references_resolve():
  for document in DOCUMENTS + [BENCHMARKS]:
    for target, anchor in re.findall(r"\]\(([^)#]*)(?:#([^)]*))?\)", document.read_text()):
      if target.startswith("http"):
        continue
      linked = (document.parent / target).resolve() if target else document
      assert linked.exists(), (document, target)
      if anchor:
        assert anchor in _anchors(linked), (document, target, anchor)
  # Docstrings cite "docs/design.md §N"; every such section exists.
  sections = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md")
                            .read_text(), re.M))
  cited = set()
  for path in ROOT.glob("**/*.py"):
    if ".venv" not in path.parts:
      cited |= set(re.findall(r"design\.md §(\d+(?:\.\d+)?)", path.read_text()))
  assert cited and cited <= sections, cited - sections


def test_readme_is_a_map_of_the_manual():
  """The README stays short enough to read as a map (issue 34: <= 250 lines; the
  benchmark results <= 400), and links every page of docs/."""
  readme = README.read_text()
  assert len(readme.splitlines()) <= 250, "README.md: over 250 lines; move the manual to docs/"
  assert len(BENCHMARKS.read_text().splitlines()) <= 400, "benchmarks/README.md: over 400 lines"
  linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
  pages = {str(page.relative_to(ROOT)) for page in MANUAL}
  assert pages <= linked, f"README.md does not link {', '.join(sorted(pages - linked))}"
