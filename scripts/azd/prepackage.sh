#!/bin/sh
# azd service hook (services.api prepackage): copy `state/` into function_app/
# so the zip azd deploys (and the Flex remote build) can import it.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec python3 "$here/package_state.py" copy "$@"
