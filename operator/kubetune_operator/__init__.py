"""The Kubetune operator: reconciles FineTuneJob objects into a ConfigMap, a CPU validation Job, a headless
Service and an Indexed training Job, and reports progress in the FineTuneJob's status.

The API it serves (spec, status, the trainer's config) is the package kubetune_api. Modules: `children` (spec ->
desired child objects, pure), `reconcile` (observed children + trainer metrics -> a Decision, pure), `observe`
(what the Jobs and pods say happened), `progress` (the trainer's metrics and reports -> status fields),
`conditions` (status conditions and times), `kube` (the API calls), `handlers` (thin kopf handlers), `metrics`
(the operator's own Prometheus metrics).
"""

GROUP = "kubetune.io"
VERSION = "v1alpha1"
PLURAL = "finetunejobs"
SWEEPS = "finetunesweeps"
SWEEP_LABEL = "kubetune.io/sweep"  # on each trial FineTuneJob (and a sweep's other children): its sweep's name
