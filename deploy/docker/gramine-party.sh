#!/bin/sh
# Start this container's party inside its Gramine-SGX enclave.
# ENCLAVEFL_PARTY names the party; its enclave was built into /opt/enclavefl/enclaves/<party>/
# when the image was built (Dockerfile.gramine). The host can choose only which of the
# measured enclaves to start: job, party name and command line are inside the measurement.
set -eu
party="${ENCLAVEFL_PARTY:?set ENCLAVEFL_PARTY to the party this container runs}"
dir="/opt/enclavefl/enclaves/${party}"
if [ ! -f "${dir}/enclavefl.manifest.sgx" ]; then
    echo "gramine-party: no signed enclave for party '${party}' in ${dir}" >&2
    exit 2
fi
# The enclave mounts its output and checkpoint directories: they must exist on the host side.
while IFS= read -r host_dir; do
    [ -n "${host_dir}" ] && mkdir -p "${host_dir}"
done < "${dir}/host-dirs"
cd "${dir}"
exec gramine-sgx enclavefl
