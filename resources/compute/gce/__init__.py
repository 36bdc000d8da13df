"""Disposable Compute Engine VMs for Dagster steps: the orchestrator's side of a GCE launch.

A module imports only modules below it in this list, never one above:

- ``launcher``: the Dagster ``StepLauncher`` and its resource (config = ``settings``);
- ``reaper`` / ``images``: deleting forgotten VMs; building and archiving images;
- ``attempts``: one step's VMs one after another: claim a warm one or create one,
  follow, delete or leave warm, resume after a preemption;
- ``follow``: relaying one VM attempt's events and logs into the run, and telling
  how it ended;
- ``inflight`` / ``lease`` / ``warm``: the in-flight index (re-attach to work in
  flight, never a second VM), the orchestrator's lease, claiming idle VMs by shape;
- ``chunks``: reading the agent's numbered chunk streams;
- ``record``: what one launch did (VMs, preemptions, cost), for logs and metadata;
- ``step_vm``: one step's VM as data: image, labels, instructions, insert spec;
- ``settings``: the one GCE settings model (experiment file, resource, launch);
- ``placement``: the zone / machine-type candidates (GPU count per machine type, fallback
  GPUs) and failover across them;
- ``costs``: the cost ledger in GCS and the budget check;
- ``catalog``: the dated GCP catalog: prices per zone (spot / on-demand), the GPUs each
  machine type carries, where each is offered (``gcp_catalog.csv``);
- ``vm_spec``: the ``instances.insert`` body (labels, scheduling, metadata, startup script);
- ``gcs`` / ``objects``: the few GCS calls the launcher makes (bundle, event chunks,
  ledger); single objects with generation preconditions (create-once, swap, delete);
- ``api`` / ``errors``: a thin wrapper over google-cloud-compute (retries transient
  errors with back-off, waits on operations, turns capacity and quota errors into one
  exception the failover catches);
- ``bundle``: a wheel of the working tree, so uncommitted code runs on the VM.

What runs on the VM is ``resources.remote`` (the agent, shipped as source text by
``vm_spec``, never imported from here).
"""
