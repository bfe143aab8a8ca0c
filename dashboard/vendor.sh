#!/usr/bin/env bash
# Refreshes the chart library vendored in dashboard/vendor/ from npm. Crier embeds these files in
# its binary, so building Crier needs no npm: run this only to move to another uPlot version
# (change it in package.json), then commit dashboard/vendor/ and package-lock.json.
#
#   cd dashboard && npm install && ./vendor.sh
set -euo pipefail
cd "$(dirname "$0")"
src=node_modules/uplot
[ -d "$src" ] || npm ci --no-audit --no-fund
mkdir -p vendor
cp "$src/dist/uPlot.esm.js" vendor/uPlot.esm.js
cp "$src/dist/uPlot.min.css" vendor/uPlot.min.css
cp "$src/LICENSE" vendor/uPlot.LICENSE
echo "vendored uPlot $(node -p "require('./$src/package.json').version") into dashboard/vendor/"
