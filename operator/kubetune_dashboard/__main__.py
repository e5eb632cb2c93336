"""`python -m kubetune_dashboard > charts/kubetune/dashboards/kubetune.json`"""

import sys

from kubetune_dashboard.dashboard import to_json

sys.stdout.write(to_json())
