"""Step launchers: run a Dagster step somewhere other than the plan process.

Dagster marks `StepLauncher` as superseded by Pipes but keeps it with no plan to
remove it. We use it on purpose: it runs the *same* asset code with the *same*
IO manager elsewhere (a local disposable worker, a GCE VM), which Pipes does not.
The supersession warning is silenced here, in one place, for that reason.
"""

import warnings

from dagster import SupersessionWarning

warnings.filterwarnings("ignore", category=SupersessionWarning)
