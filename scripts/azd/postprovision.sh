#!/bin/sh
# azd project hook (postprovision): write function_app/local.settings.json
# (untracked) for running the app locally against the provisioned resources.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec python3 "$here/local_settings.py" "$@"
