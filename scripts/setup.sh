# Sourced by scripts/main.sh and scripts/test.sh: set up, once, what the main job and the tests need on a fresh
# machine, then activate the virtual environment. Each step is skipped when it is already done.

# Debian's dataset-fashion-mnist (the main job's data, and the shipped mask's test), where apt-get may install it:
# as root, or through sudo without a password. Anywhere else this does nothing and the main job reads the same
# data from the Hugging Face Hub.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's dataset-fashion-mnist (apt-get)" >&2
    (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist) \
        || sudo -n sh -c 'apt-get update && apt-get install -y dataset-fashion-mnist' || true) >/dev/null 2>&1
fi

# The package and its test tools in .venv, installed editable; installed again whenever pyproject.toml changes
# (the stamp holds the hash of the pyproject.toml it was installed from).
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
. .venv/bin/activate
_stamp=.venv/.timm-popup-installed
_want="$(python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "setup: installing timm-popup and its dependencies into .venv (pip install -e \".[dev]\", about a minute)" >&2
    pip install -q -e ".[dev]"
    echo "$_want" > "$_stamp"
fi
unset _stamp _want
