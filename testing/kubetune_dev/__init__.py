"""Kubetune's development kit: what the tests, the demo and the dev cluster use, never shipped in an image.

    cluster/     a local Kubernetes cluster: a control plane built from upstream and a node agent that runs pods as
                 local processes (`python -m kubetune_dev.cluster up|down|status`), Kueue, the pytest plugins
    s3server     an embedded S3-protocol server (moto)
    tiny         tiny Llama bases built from scratch; tokenizer: the BPE tokenizer they use
    tiny_vision  tiny ViT and ResNet bases
    demo_data    the demo's deterministic datasets
    cli          `python -m kubetune_dev logs POD -n NS`: a pod's log on the local cluster's node agent

It is the separate distribution `kubetune-dev` (testing/pyproject.toml), installed editable by `make venv`.
"""
