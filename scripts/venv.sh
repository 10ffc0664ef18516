# Sourced by scripts/run and scripts/test: make .venv (Python >= 3.12) and install the project into it.
# Usage: ensure_venv EXTRA   (EXTRA is a pyproject optional-dependency group: demos | test)
ensure_venv() {
  local extra=$1 py=""
  for candidate in python3 python3.12 python3.13 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      py=$candidate
      break
    fi
  done
  if [ -z "$py" ]; then
    echo "mcpmeter needs Python >= 3.12 (with pyenv: 'pyenv install 3.12'; .python-version selects it)" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    rm -rf .venv
    "$py" -m venv .venv
  fi
  # Reinstall only when the dependency list changed since the last install of this extra.
  local stamp=".venv/.installed-$extra-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[$extra]"
    touch "$stamp"
  fi
}
