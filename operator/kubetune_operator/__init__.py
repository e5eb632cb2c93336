"""The Kubetune operator: reconciles FineTuneJob objects into a ConfigMap, a CPU validation Job, a headless
Service and an Indexed training Job, and reports progress in the FineTuneJob's status.

Modules: `crd` (the CRD, generated from the typed API), `children` (spec -> desired child objects, pure),
`status` (observed children + trainer metrics -> status and actions, pure), `kube` (the API calls),
`handlers` (thin kopf handlers), `metrics` (the operator's own Prometheus metrics).
"""

GROUP = "kubetune.io"
VERSION = "v1alpha1"
PLURAL = "finetunejobs"
