# Sourced by scripts/demo and scripts/test with the extra each needs ("demo", "test"): create .venv when missing and
# install the project with that extra into it, unless it already was, from this pyproject.toml and this folder.
set -euo pipefail
extra="$1"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.acnet-installed-$extra"  # pip takes seconds even with nothing to do: skip it when nothing changed
digest='import hashlib, os; print(hashlib.sha256(open("pyproject.toml", "rb").read() + os.getcwd().encode()).hexdigest())'
wanted="$(.venv/bin/python -c "$digest")"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extra]"
  echo "$wanted" > "$stamp"
fi
