"""Code that runs in the step worker or on the VM, apart from the orchestrator side.

``protocol`` (stdlib only) holds every name shared across that boundary; the agent
ships to the VM beside it.
"""
