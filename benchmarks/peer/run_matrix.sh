#!/usr/bin/env bash
# Run the peer (fed-rag 0.0.27) matrix back to back: {lsr, ralt} x K in ${KS} x ${REPEATS}.
#
# Usage: bash benchmarks/peer/run_matrix.sh [OUTDIR]
#   env: REPEATS (3), KS ("2 4"), METHODS ("lsr ralt"), GENERATOR (default: a tiny random
#        Llama made once under benchmarks/results/tmp/tiny-llama), EXTRA (more run_peer args)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${HERE}/../.peer-venv/bin/python"  # made by setup_peer_venv.sh
OUTDIR="${1:-${HERE}/results}"
REPEATS="${REPEATS:-3}"
KS="${KS:-2 4}"
METHODS="${METHODS:-lsr ralt}"
GENERATOR="${GENERATOR:-${HERE}/../results/tmp/tiny-llama}"

bash "${HERE}/setup_peer_venv.sh"
if [[ ! -f "${GENERATOR}/config.json" ]]; then
    "${PY}" "${HERE}/make_tiny_generator.py" --out "${GENERATOR}"
fi
mkdir -p "${OUTDIR}"
for rep in $(seq 1 "${REPEATS}"); do
    for method in ${METHODS}; do
        for k in ${KS}; do
            out="${OUTDIR}/${method}-k${k}-r${rep}.json"
            echo "== ${method} K=${k} repeat ${rep} -> ${out}"
            # shellcheck disable=SC2086
            "${PY}" "${HERE}/run_peer.py" --method "${method}" --clients "${k}" \
                --generator "${GENERATOR}" --out "${out}" ${EXTRA:-} || true
        done
    done
done
python3 "${HERE}/summarize.py" "${OUTDIR}"/*.json
