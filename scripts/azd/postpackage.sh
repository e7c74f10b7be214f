#!/bin/sh
# azd service hook (services.api postpackage): the zip is built; drop the
# vendored copy so local runs import the real `state` package.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec python3 "$here/package_state.py" clean "$@"
