"""Shared infrastructure any experiment can reuse: storage, IO manager, step launchers,
model cache, cost accounting, the VM-side agent. Never imports ``lab_assets``."""
