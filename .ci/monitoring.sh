#!/usr/bin/env bash
# Checks the Prometheus files of deploy/prometheus/ with promtool (Debian package
# `prometheus`; .ci/run installs it): the sample configuration and the rules it loads, and the
# rules' unit tests (a firing and a not-firing case for every alert).
#
#   bash .ci/monitoring.sh
#
# Which metrics the rules and the dashboard use, checked against a real scrape of pmad, and
# a real Prometheus scraping pmad, are integration tests (tests/integration/monitoring.rs).
set -euo pipefail
cd "$(dirname "$0")/../deploy/prometheus"

promtool --version 2>&1 | head -n1
promtool check config prometheus.yml
promtool check rules pmad-rules.yml
promtool test rules pmad-rules.test.yml
