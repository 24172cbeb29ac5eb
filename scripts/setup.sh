#!/usr/bin/env bash
# One-command, idempotent setup: .venv, pinned Python deps, Rust crates, release build of rustbpe.
# Safe to rerun: each step is skipped when its inputs (pyproject.toml, rustbpe sources) are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
STAMPS=$ROOT/.setup-stamps
PY=${PYTHON:-python3}
mkdir -p "$STAMPS"
say() { printf '[setup] %s\n' "$*"; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# 1. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python

# 2. Python dependencies, pinned in pyproject.toml (torch==2.13.0: a CPU wheel where there is no CUDA).
deps_hash=$(hash_of pyproject.toml)
if [ "$(cat "$STAMPS/deps" 2>/dev/null)" != "$deps_hash" ]; then
  say "installing Python dependencies (pyproject.toml changed or first run)"
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -m pip install --quiet "torch==2.13.0"
  "$VPY" -m pip install --quiet -e ".[dev]"
  echo "$deps_hash" > "$STAMPS/deps"
else
  say "Python dependencies up to date"
fi

# 3. Rust crates: crates.io when reachable, else Debian's librust-*-dev through cargo source replacement.
command -v cargo >/dev/null || { echo "[setup] error: cargo not found; install Rust (https://rustup.rs) and rerun" >&2; exit 1; }
CARGO_CFG=$ROOT/rustbpe/.cargo/config.toml
if curl -sfI --max-time 8 https://index.crates.io/config.json >/dev/null 2>&1; then
  rm -f "$CARGO_CFG"
else
  say "crates.io unreachable: using Debian's vendored crates (/usr/share/cargo/registry)"
  need=(librust-pyo3-dev librust-fancy-regex-dev librust-regex-dev librust-regex-syntax-dev librust-rayon-dev librust-ahash-dev)
  missing=()
  for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  mkdir -p "$(dirname "$CARGO_CFG")"
  cat > "$CARGO_CFG" <<'CFG'
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "/usr/share/cargo/registry"

[net]
offline = true
CFG
fi

# 4. Release build of our BPE trainer (import name nanopipe_bpe; PyPI's `rustbpe` stays importable beside it).
bpe_hash=$(hash_of rustbpe/Cargo.toml rustbpe/pyproject.toml rustbpe/src/*.rs "$CARGO_CFG" 2>/dev/null || true)
if [ "$(cat "$STAMPS/rustbpe" 2>/dev/null)" != "$bpe_hash" ] || ! "$VPY" -c "import nanopipe_bpe" 2>/dev/null; then
  say "building rustbpe (release)"
  rm -rf "$ROOT/rustbpe/target/wheels"
  (cd rustbpe && "$VENV/bin/maturin" build --release --quiet --interpreter "$VPY" -o target/wheels)
  "$VPY" -m pip install --quiet --force-reinstall --no-deps rustbpe/target/wheels/*.whl
  echo "$bpe_hash" > "$STAMPS/rustbpe"
else
  say "rustbpe build up to date"
fi
# 5. The sandbox's OS layer for model-written code: bubblewrap (+ libseccomp for its seccomp filters).
if ! command -v bwrap >/dev/null || ! ldconfig -p 2>/dev/null | grep -q libseccomp.so.2; then
  if command -v apt-get >/dev/null; then
    say "installing bubblewrap and libseccomp2 (the sandbox for model-written code)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap libseccomp2 >/dev/null) \
      || say "WARNING: could not install bubblewrap: model-written code will run without OS isolation"
  else
    say "WARNING: bubblewrap (bwrap) not found and apt-get unavailable: install bubblewrap by hand, or model-written code runs without OS isolation"
  fi
fi
# 6. Test-only: a headless Chromium for the web UI test (Debian's package; skipped when apt is unavailable).
if [ "${SETUP_TEST_DEPS:-0}" = 1 ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  say "installing chromium for the browser test"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
    || say "could not install chromium; the browser test will be skipped"
fi
"$VPY" -c "import nanopipe_bpe, torch, prefect; print('[setup] ok: torch', torch.__version__, '| prefect', prefect.__version__)"
