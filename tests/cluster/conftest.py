"""Tests against a real local control plane (`make control-plane` builds its binaries). Each module names the
fixture plugins it uses (`pytest_plugins`), as every cluster test does: importing a fixture here would define a
second session fixture of the same name, and with it a second control plane (and node agent) for this folder
alone, running beside the shared one until the session ends."""
