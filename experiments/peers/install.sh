#!/usr/bin/env bash
# One peer's virtualenv, for `make peers`: .peers/NAME/ from experiments/peers/NAME/requirements.txt.
#   install.sh NAME PYTHON [pip options...]
# Success: .peers/NAME/.installed (the stamp make checks) and .peers/NAME/.seconds.
# Failure: .peers/NAME.failed says why (pip's last error line); the peer is skipped, make goes on
# (exit 0), and the grid reports the peer's cells as failed with that reason. A failed peer is
# tried again only when its requirements change or its .failed file is deleted.
set -uo pipefail
name=$1 python=$2
shift 2
req=experiments/peers/$name/requirements.txt
dest=.peers/$name
failed=.peers/$name.failed
log=.peers/$name.log
mkdir -p .peers
if [[ -f $failed && $failed -nt $req ]]; then
    echo "peers: $name skipped: could not be installed before ($(cat "$failed")); delete $failed to try again"
    exit 0
fi
echo "peers: installing $name into $dest (log: $log)"
start=$(date +%s)
rm -rf "$dest"
if "$python" -m venv "$dest" >"$log" 2>&1 \
    && "$dest/bin/pip" install --quiet --upgrade pip >>"$log" 2>&1 \
    && "$dest/bin/pip" install "$@" -r "$req" >>"$log" 2>&1 \
    && "$dest/bin/python" -c "import anndata, numpy" >>"$log" 2>&1; then
    seconds=$(( $(date +%s) - start ))
    echo "$seconds" > "$dest/.seconds"
    rm -f "$failed"
    touch "$dest/.installed"
    echo "peers: $name installed in ${seconds} s"
else
    why=$(grep -E "^(ERROR|error)" "$log" | tail -n 1)
    [[ -n $why ]] || why=$(grep -v '^\s*$' "$log" | tail -n 1)
    echo "pip failed after $(( $(date +%s) - start )) s: ${why:-no message} (see $log)" > "$failed"
    rm -rf "$dest"
    echo "peers: $name NOT installed, skipped: $(cat "$failed")"
fi
exit 0
