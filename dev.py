#!/usr/bin/env python3
"""Sets up .venv from the pinned requirements, then runs a command in it.

    python3 dev.py demo        the main job on the bundled dataset
    python3 dev.py test        the linter (ruff), then the test suite
    python3 dev.py patchnet …  any `patchnet` command
    python3 dev.py bench NAME  a benchmark in bench/ (bulk, heatmap, memory, multiworker, pipeline,
                              precision, rest_servers, serving, serving_restart, train)

Needs only Python 3.11. The environment is rebuilt when requirements.txt or
pyproject.toml change.
"""

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.environ.get("PATCHNET_VENV", os.path.join(ROOT, ".venv"))
PYTHON = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".requirements-hash")


def requirements_hash():
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        with open(os.path.join(ROOT, name), "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def ensure_environment():
    wanted = requirements_hash()
    if os.path.exists(STAMP):
        with open(STAMP) as file:
            if file.read() == wanted:
                return
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"dev.py: Python 3.11 is required (TensorFlow 2.21 pins), this is {sys.version.split()[0]}")
    print(f"dev.py: setting up {VENV} (a few minutes the first time)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + ["-r", os.path.join(ROOT, "requirements.txt")], check=True)
    subprocess.run(pip + ["--no-deps", "--no-build-isolation", "-e", ROOT], check=True)
    with open(STAMP, "w") as file:
        file.write(wanted)


def main(argv):
    if not argv or argv[0] not in ("demo", "test", "patchnet", "bench"):
        sys.exit(__doc__)
    ensure_environment()
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if command == "test":  # the linter first (configured in pyproject.toml), then the suite
        if subprocess.run([os.path.join(VENV, "bin", "ruff"), "check", ROOT]).returncode != 0:
            sys.exit("dev.py test: ruff found the problems above (`.venv/bin/ruff check --fix` mends many)")
        args = [PYTHON, "-m", "pytest", "-q", *rest]
    elif command == "bench":
        if not rest:
            sys.exit("dev.py bench NAME: one of " + ", ".join(sorted(
                name[:-3] for name in os.listdir(os.path.join(ROOT, "bench"))
                if name.endswith(".py") and not name.startswith(("_", "common")))))
        args = [PYTHON, "-m", f"bench.{rest[0]}", *rest[1:]]
    elif command == "demo":
        args = [PYTHON, "-m", "patchnet_tf", "demo", *rest]
    else:
        args = [PYTHON, "-m", "patchnet_tf", *rest]
    os.chdir(ROOT)
    os.execv(PYTHON, args)


if __name__ == "__main__":
    main(sys.argv[1:])
