"""Disposable Compute Engine VMs for Dagster steps: everything the GCE launcher stands on.

- ``api``: a thin wrapper over google-cloud-compute (waits on operations, turns the
  API's capacity and quota errors into one exception type the failover catches);
- ``body``: the ``instances.insert`` body (labels, scheduling, metadata, startup script);
- ``placement``: the zone / machine-type candidates and failover across them;
- ``costs``: the price table, the cost ledger in GCS and the budget check;
- ``gcs``: the few GCS calls the launcher makes (bundle, event chunks, ledger);
- ``bundle``: a wheel of the working tree, so uncommitted code runs on the VM;
- ``launch_info``: what the step, on the VM, knows about the VM it runs on;
- ``preemption``: the step-side half of checkpoint-on-SIGTERM;
- ``reaper`` / ``images``: deleting forgotten VMs; building and archiving images.

The VM-side agent is ``resources.remote.agent`` (stdlib + google-cloud-storage only).
"""
