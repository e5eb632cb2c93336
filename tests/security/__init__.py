"""The adversarial suite (issue 27, docs/security.md): for each attack, what a tenant tries and what Kubetune answers.

One file per promise; each test's docstring says the attack and the expected answer in a sentence a newcomer can read.
"""
