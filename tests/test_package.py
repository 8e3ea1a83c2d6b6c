"""The installable package: the wheel's contents, the `featstack` command installed in a venv, and quiet output."""
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from featstack.commands import COMMANDS

from conftest import ROOT

# What TensorFlow, absl and CUDA print on their own: glog-style lines (I0000 00:00:... file.cc:12]), absl's
# pre-initialisation notice, CUDA probing, oneDNN, retracing, and Keras's download line.
LIBRARY_NOISE = re.compile(r"^[IWEF]\d{4} |absl|cuInit|cuda|oneDNN|tensorflow|retracing|Downloading data from",
                           re.IGNORECASE | re.MULTILINE)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """`pip wheel --no-deps .` of a copy of the source (the build leaves build/ and *.egg-info behind)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "featstack", src / "featstack", ignore=shutil.ignore_patterns("__pycache__"))
    dist = src / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                           "-w", str(dist)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (whl,) = dist.glob("featstack-*.whl")
    return whl


def requirements_txt():
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def test_wheel_holds_every_command_the_web_page_the_entry_point_and_the_requirements(wheel):
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for module in COMMANDS.values():
        assert module.replace(".", "/") + ".py" in names
    static = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "featstack" / "static").glob("*"))
    assert static and set(static) <= names  # serve's page ships with the package
    assert not any(n.startswith(("tests/", "notebooks/", "benchmarks/")) for n in names)
    info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    assert "featstack = featstack.__main__:main" in archive.read(f"{info}/entry_points.txt").decode()
    meta = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    runtime = [r for r in requires if r.marker is None]
    assert sorted(map(str, runtime)) == sorted(map(str, requirements_txt()))  # the two installs agree
    assert {"ray", "serve", "audit", "dev"} <= set(meta.get_all("Provides-Extra"))


@pytest.mark.slow
def test_installed_console_script_runs_outside_the_repository(wheel, demo, tmp_path):
    # A fresh venv that borrows this one's dependencies through a .pth file, so nothing is downloaded.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "borrowed_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "elsewhere"  # not the checkout: only the installed copy can answer
    work.mkdir()

    def featstack(*args):
        return subprocess.run([str(env_dir / "bin" / "featstack"), *map(str, args)], cwd=work, capture_output=True,
                              text=True)

    proc = featstack("--help")
    assert proc.returncode == 0 and all(name in proc.stdout for name in COMMANDS), proc.stderr
    proc = featstack("stack", "--list", "--models-dir", demo["models"])
    assert proc.returncode == 0 and demo["run"].name in proc.stdout, proc.stderr
    proc = featstack("submit", "--run", demo["run"], "--submissions-dir", work / "subs")
    assert proc.returncode == 0, proc.stderr
    assert (work / "subs" / f"{demo['run'].name}.csv").is_file()
    origin = subprocess.run([str(python), "-c", "import featstack; print(featstack.__file__)"], cwd=work,
                            capture_output=True, text=True).stdout
    assert origin.startswith(str(env_dir)), origin  # the installed copy ran, not the checkout


def _extract_cli(demo, *extra):
    args = ["--demo", "--data", demo["data"], "--features-dir", demo["base"] / "features", "--weights", "random",
            "--backbones", "resnet50,vgg16", "--image-size", 32, "--batch-size", 64, *extra]
    return subprocess.run([sys.executable, "-m", "featstack", "extract", *map(str, args)], cwd=demo["base"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_cached_rerun_prints_no_library_lines_unless_verbose(demo):
    proc = _extract_cli(demo)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert not LIBRARY_NOISE.search(output), LIBRARY_NOISE.search(output).group(0)
    assert re.search(r"^resnet50\s+1797\s+2048\s+0\s+0\s+1797", proc.stdout, re.MULTILINE)  # new 0, changed 0
    import keras
    if keras.backend.backend() != "tensorflow":
        return  # JAX and torch print nothing at start-up on CPU; the check below is about TensorFlow's lines
    proc = _extract_cli(demo, "--verbose", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert LIBRARY_NOISE.search(proc.stdout + proc.stderr)  # --verbose lets them through: the check above can fail


# Options without which a command cannot run, and what the help says about them.
REQUIRED = {"extract": ("--data", "required unless --demo"), "stack": ("--features", "required unless --list")}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_marks_required_options_ends_with_examples_and_agrees_with_readme(command, capsys):
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(COMMANDS[command]).main(["--help"], prog=f"featstack {command}")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    options_part, examples_part = out.split("\nexamples:\n")
    examples = [line for line in examples_part.splitlines() if line.startswith(f"  featstack {command}")]
    assert 2 <= len(examples) <= 3
    if command in REQUIRED:
        option, mark = REQUIRED[command]
        assert re.search(rf"^  {option} \S+\s+{mark}", options_part, re.MULTILINE)
        # The usage line shows it as required: bare on the first form, not in brackets.
        assert re.match(rf"usage: featstack {command} {option} [A-Z]+ \[options\]\n", out), out.splitlines()[0]
    readme = (ROOT / "README.md").read_text()
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", options_part)) - {"--help"}
    undocumented = sorted(o for o in options if not re.search(rf"`[^`\n]*{o}(?![\w-])", readme))
    assert not undocumented, f"featstack {command}: options missing from README.md: {undocumented}"


@pytest.mark.parametrize("argv", [["--help"], ["help"], ["-h"]])
def test_featstack_help_lists_every_command_with_its_purpose_and_examples(argv, capsys):
    from featstack.__main__ import main
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    commands_part = out.split("\ncommands:\n")[1].split("\n\n")[0]
    for name, module in COMMANDS.items():
        first_words = " ".join(importlib.import_module(module).DESCRIPTION.split()[:4])
        assert re.search(rf"^  {name} +{re.escape(first_words)}", commands_part, re.MULTILINE), name
    examples = [line.split("#")[0].split() for line in out.split("\nexamples:\n")[1].splitlines()]
    assert {e[1] for e in examples if e[:1] == ["featstack"]} >= {"extract", "stack", "submit", "predict", "help"}


def test_featstack_help_command_is_the_command_help_and_unknown_names_the_list(capsys):
    from featstack.__main__ import main
    with pytest.raises(SystemExit) as exited:
        main(["help", "stack"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage: featstack stack --features")
    with pytest.raises(SystemExit) as exited:
        main(["hlep"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("featstack: unknown command 'hlep'; choose one of "
                                               f"{', '.join(COMMANDS)} (featstack --help lists them)")
