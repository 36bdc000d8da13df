"""The VM's first-boot helper: phase reports to GCS, and the agent's systemd unit.

The startup script runs this with the image's own ``python3`` (Python 3.10 on the
Deep Learning VM image) before any venv exists, so it is standard library only and
3.10-compatible; it ships beside the agent (``protocol.VM_MODULES``). Two commands:

- ``report PHASE STATE [--log FILE] [--detail TEXT]``: record that a bootstrap phase
  started, finished, was skipped or failed (with the tail of its output, from
  ``--log``), and upload every phase so far as one JSON object to GCS within
  seconds: ``<attempt prefix>/boot.json`` for a step (``protocol.BOOT_FILE``), so
  that the launcher shows "bootstrap failed: <phase>: <tail>" at once instead of
  waiting out its boot timeout. In the image modes a failure is also written as
  the mode's own report (``report_uri``), which the image manager is waiting for.
  The upload is the GCS JSON API over urllib with the metadata server's
  service-account token (``STORAGE_EMULATOR_HOST``: that emulator, anonymously).
- ``unit --home DIR``: print the ``lab-agent.service`` unit that runs the agent as a
  service of its own (not as a child of the startup-script runner), with every path
  escaped as systemd's unit-file syntax requires.

A report that cannot be delivered is said on stderr (the serial console) and never
fails the boot: the launcher then falls back to the console's tail.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from resources.remote.protocol import (
    BOOT_FILE,
    HOME_ENV,
    INSTRUCTIONS_KEY,
    METADATA_HOST_ENV,
    TOKEN_PATH,
    attempt_prefix,
    emulator_host,
    parse_gs_uri,
)

STATES = ("start", "done", "skipped", "failed")
TAIL_LINES = 40
TAIL_CHARS = 4000
GCS_API = "https://storage.googleapis.com"
# What the agent's unit does on `systemctl stop` and at an ACPI shutdown: SIGTERM to
# the agent alone (it stops its step worker itself), SIGKILL to all that is left after
# STOP_TIMEOUT_S: inside a spot VM's 30 s notice.
STOP_TIMEOUT_S = 25


# -- the metadata server ---------------------------------------------------------------------


def _md(path: str, timeout: float = 5.0) -> str | None:
    host = os.environ.get(METADATA_HOST_ENV) or "metadata.google.internal"
    req = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def targets(instr: dict) -> tuple[str | None, str | None]:
    """(gs:// URI of the boot report, gs:// URI of the mode's own report or None)."""
    if instr.get("launch_uri"):
        bucket, prefix = parse_gs_uri(instr["launch_uri"])
        attempt = int(instr.get("attempt", 1))
        return f"gs://{bucket}/{attempt_prefix(prefix, attempt)}/{BOOT_FILE}", None
    report = instr.get("report_uri")
    if report:
        base = report[: -len(".json")] if report.endswith(".json") else report
        return f"{base}.boot.json", report
    return None, None


# -- GCS through its JSON API ----------------------------------------------------------------


def upload_json(uri: str, body: dict, tries: int = 3) -> None:
    """Write `body` to `uri` (gs://bucket/name), retrying what passes; raises the last error."""
    bucket, name = parse_gs_uri(uri)
    base = emulator_host()
    headers = {"Content-Type": "application/json"}
    if base is None:
        base = GCS_API
        token = json.loads(_md(TOKEN_PATH) or "{}").get("access_token")
        if not token:
            raise RuntimeError("the metadata server gave no service-account token")
        headers["Authorization"] = f"Bearer {token}"
    url = (
        f"{base.rstrip('/')}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
        f"?uploadType=media&name={urllib.parse.quote(name, safe='')}"
    )
    data = json.dumps(body).encode()
    for i in range(tries):
        try:
            req = urllib.request.Request(url, data=data, method="POST", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
            return
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429, 500, 502, 503, 504) or i == tries - 1:
                detail = e.read().decode(errors="replace")[:300]
                raise RuntimeError(f"GCS answered {e.code} for {uri}: {detail}") from None
        except (urllib.error.URLError, OSError):
            if i == tries - 1:
                raise
        time.sleep(0.3 * 2**i)


# -- report ----------------------------------------------------------------------------------


def tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-TAIL_LINES:])[-TAIL_CHARS:]


def _state_file() -> Path:
    home = Path(os.environ.get("LAB_HOME") or "/opt/lab")
    return home / "boot" / "report.json"


def report(phase: str, state: str, log: str | None = None, detail: str = "") -> dict:
    """Record one phase's news in the local state and upload the whole record."""
    if state not in STATES:
        raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
    path = _state_file()
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        instr = json.loads(_md(f"instance/attributes/{INSTRUCTIONS_KEY}") or "{}")
        boot_uri, mode_report = targets(instr)
        rec = {
            "vm": _md("instance/name") or "",
            "boot_uri": boot_uri,
            "mode_report_uri": mode_report,
            "started": time.time(),
            "phases": [],
        }
    now = time.time()
    phases = rec["phases"]
    entry = next((p for p in phases if p["name"] == phase), None)
    if entry is None:
        entry = {"name": phase, "started": now}
        phases.append(entry)
    entry.update(state=state, t=now, seconds=round(now - entry["started"], 2))
    if detail:
        entry["detail"] = detail
    if state == "failed":
        entry["tail"] = tail(log)
        rec["failed"] = {"phase": phase, "tail": entry["tail"], "detail": detail}
    rec["state"] = "failed" if state == "failed" else "running"
    rec["t"] = now
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)
    if rec.get("boot_uri"):
        upload_json(rec["boot_uri"], rec)
    if state == "failed" and rec.get("mode_report_uri"):
        text = f"bootstrap failed: {phase}: {entry['tail'] or detail}"
        upload_json(rec["mode_report_uri"], {"ok": False, "error": text})
    return rec


# -- the agent's unit ------------------------------------------------------------------------


def _exec_arg(s: str) -> str:
    """One ExecStart= argument: quoted, with systemd's escapes for \\ " $ and %."""
    if "\n" in s or "\r" in s:
        raise ValueError(f"a newline cannot go into a unit file: {s!r}")
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%")
    return f'"{s}"'


def _env_assignment(key: str, value: str) -> str:
    """One Environment= assignment, quoted (no variable expansion there, specifiers yes)."""
    if "\n" in value:
        raise ValueError(f"a newline cannot go into a unit file: {value!r}")
    v = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{key}={v}"'


def _path_setting(p: str) -> str:
    if "\n" in p:
        raise ValueError(f"a newline cannot go into a unit file: {p!r}")
    return p.replace("%", "%%")


# The unit's entry point: the agent's modules' directory goes first on ``sys.path`` only (not
# on PYTHONPATH, not as the working directory), so the processes the agent starts (pip, the
# step worker, the health check) see the installed bundle, never those modules.
AGENT_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from resources.remote.agent_unit import run; sys.exit(run())"
)


def unit(home: str) -> str:
    """The agent's systemd unit for a lab installed under `home` (absolute)."""
    if not home.startswith("/"):
        raise ValueError(f"the lab's home must be an absolute path, not {home!r}")
    argv = [f"{home}/venv/bin/python", "-u", "-c", AGENT_BOOT, f"{home}/agent"]
    return "\n".join(
        [
            "# Written by the lab's startup script: the agent runs as a service of its own, so",
            "# stopping the startup-script runner neither stops it nor closes its output.",
            "[Unit]",
            "Description=Task-geometry lab agent",
            "After=network-online.target",
            "Wants=network-online.target",
            # Stopped after google-shutdown-scripts.service has run the shutdown script, which
            # asks the agent to checkpoint and waits for it (stop order is start order reversed).
            "Before=google-shutdown-scripts.service",
            "",
            "[Service]",
            "Type=simple",
            f"Environment={_env_assignment(HOME_ENV, f'{home}/run')}",
            f"Environment={_env_assignment('LAB_HOME', home)}",
            f"Environment={_env_assignment('PYTHONUNBUFFERED', '1')}",
            f"WorkingDirectory={_path_setting(home)}",
            "ExecStart=" + " ".join(_exec_arg(a) for a in argv),
            "Restart=no",
            "KillMode=mixed",
            f"TimeoutStopSec={STOP_TIMEOUT_S}",
            "StandardOutput=journal+console",
            "StandardError=inherit",
            "",
        ]
    )


# -- command line ----------------------------------------------------------------------------

USAGE = (
    "usage: vm_boot report PHASE {start,done,skipped,failed} [--log FILE] [--detail TEXT]\n"
    "       vm_boot unit --home DIR"
)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, str] = {}
    pos: list[str] = []
    while args:
        a = args.pop(0)
        if a in ("--log", "--detail", "--home") and args:
            opts[a[2:]] = args.pop(0)
        elif a.startswith("--"):
            print(f"vm_boot: unknown option {a}\n{USAGE}", file=sys.stderr)
            return 2
        else:
            pos.append(a)
    if pos[:1] == ["unit"] and len(pos) == 1 and "home" in opts:
        sys.stdout.write(unit(opts["home"]))
        return 0
    if pos[:1] == ["report"] and len(pos) == 3 and pos[2] in STATES:
        try:
            report(pos[1], pos[2], opts.get("log"), opts.get("detail", ""))
        except Exception as e:  # never fail the boot over a report: the console has it
            print(f"vm_boot: could not report {pos[1]} {pos[2]}: {e}", file=sys.stderr)
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
