#!/bin/sh
# azd project hook (preprovision): refuse an environment Bicep would deploy into an app
# that cannot work (scripts/azd/preprovision.py), before any resource is created.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec python3 "$here/preprovision.py"
