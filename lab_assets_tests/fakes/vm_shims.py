"""Stand-ins for the commands a fake VM's startup script runs that cannot run here.

The fake Compute Engine runs the real startup and shutdown scripts with bash, with a
directory of these shims first on ``PATH`` (``install``): ``systemctl`` (hands the
unit to the fake's PID 1, ``fake_systemd``), ``curl`` (the real curl for the fake
metadata server; the uv installer for astral.sh; no other host resolves), ``uv``
(``python install`` / ``venv`` / ``pip install``, linking the test interpreter's venv
instead of downloading), ``nvidia-smi`` (the fake VM's GPUs and driver), and
``apt-get`` / ``apt`` / ``dpkg`` / ``fuser``, which always fail: the startup script must
not need apt (on a first boot the image's own services hold the dpkg lock).

Each shim accepts only the commands and flags the real tool has and that the lab
uses, and fails loudly, as the real tool would, on anything else, so a broken script
fails its test. ``LAB_FAKE_FAIL`` (JSON: command prefix -> message) makes a matching
command fail on purpose, e.g. ``{"uv python install": "error: ..."}``. Standard
library only; the machine's facts come from ``LAB_FAKE_*`` variables the fake sets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIMS = ("systemctl", "curl", "uv", "nvidia-smi", "apt-get", "apt", "dpkg", "fuser")
TORCH_INDEX = re.compile(r"^https://download\.pytorch\.org/whl/(cu\d+|cpu|rocm[\d.]+)$")


def install(directory: Path, python: str = sys.executable) -> Path:
    """Write one executable per shim into `directory` (run by `python`); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in SHIMS:
        p = directory / name
        # Written aside and renamed into place: another fake VM may be running the shim
        # right now (writing an executing file fails with "Text file busy").
        tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(
            f"#!{python} -S\nimport sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n"
            "from lab_assets_tests.fakes.vm_shims import main\n"
            f"sys.exit(main({name!r}, sys.argv[1:]))\n"
        )
        tmp.chmod(0o755)
        os.replace(tmp, p)
    return directory


def _die(msg: str, code: int = 1) -> int:
    print(msg, file=sys.stderr)
    return code


def _injected(name: str, argv: list[str]) -> str | None:
    faults = json.loads(os.environ.get("LAB_FAKE_FAIL") or "{}")
    line = " ".join([name, *argv])
    return next((msg for prefix, msg in faults.items() if line.startswith(prefix)), None)


def main(name: str, argv: list[str]) -> int:
    msg = _injected(name, argv)
    if msg is not None:
        return _die(msg, 2)
    fn = {
        "systemctl": systemctl,
        "curl": curl,
        "uv": uv,
        "nvidia-smi": nvidia_smi,
    }.get(name)
    if fn is None:  # apt-get, apt, dpkg, fuser
        return _die(
            f"{name} (fake VM): the lab's startup script must not need apt or dpkg: on a first "
            "boot the image's own services hold the dpkg lock",
            100,
        )
    return fn(argv)


# -- systemctl -------------------------------------------------------------------------------

_KEYS = {
    "Unit": {"Description", "After", "Wants", "Before", "Requires"},
    "Service": {
        "Type",
        "Environment",
        "WorkingDirectory",
        "ExecStart",
        "Restart",
        "KillMode",
        "TimeoutStopSec",
        "StandardOutput",
        "StandardError",
        "User",
    },
    "Install": {"WantedBy"},
}
_CHOICES = {
    "Type": {"simple", "exec", "oneshot", "notify"},
    "Restart": {"no", "on-failure", "always", "on-abnormal"},
    "KillMode": {"control-group", "mixed", "process", "none"},
    "StandardError": {"inherit", "journal", "journal+console", "console", "null"},
}


def _unquote_words(value: str, exec_line: bool) -> list[str]:
    """Split a unit-file value into words as systemd does: "..." quoting, \\ escapes,
    %% for %, and (ExecStart= only) $$ for $; other specifiers and $VARs are refused."""
    words: list[str] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            break
        quoted = value[i] == '"'
        if quoted:
            i += 1
        word = []
        while i < n:
            c = value[i]
            if quoted and c == '"':
                i += 1
                break
            if not quoted and c in " \t":
                break
            if c == "\\":
                if i + 1 >= n:
                    raise ValueError(f"a lone backslash ends {value!r}")
                esc = value[i + 1]
                if esc not in '\\"':
                    raise ValueError(f"unsupported escape \\{esc} in {value!r}")
                word.append(esc)
                i += 2
                continue
            if c == "%":
                if value[i + 1 : i + 2] != "%":
                    raise ValueError(f"unescaped % (a specifier) in {value!r}")
                word.append("%")
                i += 2
                continue
            if c == "$" and exec_line:
                if value[i + 1 : i + 2] != "$":
                    raise ValueError(f"unescaped $ (a variable) in ExecStart= {value!r}")
                word.append("$")
                i += 2
                continue
            word.append(c)
            i += 1
        else:
            if quoted:
                raise ValueError(f"unterminated quote in {value!r}")
        words.append("".join(word))
    return words


def parse_unit(text: str, name: str) -> dict:
    """The unit file as systemd reads it, refusing what it would reject or we do not model."""
    section = None
    seen: dict[str, list[str]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            if section not in _KEYS:
                raise ValueError(f"{name}:{lineno}: unknown section [{section}]")
            continue
        if section is None or "=" not in line:
            raise ValueError(f"{name}:{lineno}: not an assignment in a section: {raw!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        if key not in _KEYS[section]:
            raise ValueError(f"{name}:{lineno}: unknown key {key!r} in section [{section}]")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(f"{name}:{lineno}: {key}={value} is not one of {_CHOICES[key]}")
        seen.setdefault(key, []).append(value)
    if "ExecStart" not in seen:
        raise ValueError(f"{name}: Service has no ExecStart= setting")
    if len(seen["ExecStart"]) != 1:
        raise ValueError(f"{name}: more than one ExecStart= for a non-oneshot service")
    argv = _unquote_words(seen["ExecStart"][0], exec_line=True)
    if not argv or not argv[0].startswith("/"):
        raise ValueError(f"{name}: ExecStart= must start with an absolute path: {argv[:1]}")
    env = {}
    for value in seen.get("Environment", []):
        for word in _unquote_words(value, exec_line=False):
            k, sep, v = word.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"{name}: invalid Environment= assignment {word!r}")
            env[k] = v
    cwd = "/"
    if "WorkingDirectory" in seen:
        (cwd,) = seen["WorkingDirectory"][-1:]
        if "%" in cwd.replace("%%", ""):
            raise ValueError(f"{name}: unescaped % in WorkingDirectory={cwd}")
        cwd = cwd.replace("%%", "%")
        if not cwd.startswith("/"):
            raise ValueError(f"{name}: WorkingDirectory= must be absolute: {cwd}")
    stop = (seen.get("TimeoutStopSec") or ["90"])[-1]
    m = re.fullmatch(r"(\d+)(s?)", stop)
    if not m:
        raise ValueError(f"{name}: TimeoutStopSec={stop} is not seconds")
    stdout = (seen.get("StandardOutput") or ["journal"])[-1]
    if not (
        stdout in ("journal", "console", "journal+console", "null", "inherit", "tty")
        or re.fullmatch(r"(append|file):/.+", stdout)
    ):
        raise ValueError(f"{name}: StandardOutput={stdout} is not valid")
    before = [w for v in seen.get("Before", []) for w in v.split()]
    return {
        "name": name,
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "kill_mode": (seen.get("KillMode") or ["control-group"])[-1],
        "timeout_stop_s": float(m.group(1)),
        "stdout": stdout,
        "before": before,
        "restart": (seen.get("Restart") or ["no"])[-1],
    }


def systemctl(argv: list[str]) -> int:
    args = [a for a in argv if a not in ("--no-block", "--quiet", "-q", "--no-pager")]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        return _die(f"systemctl: unrecognized option '{unknown[0]}'")
    unit_dir = Path(os.environ.get("LAB_UNIT_DIR") or "/nonexistent")
    if args == ["daemon-reload"]:
        for f in sorted(unit_dir.glob("*.service")):
            try:
                parse_unit(f.read_text(), f.name)
            except ValueError as e:
                return _die(f"systemd: {e}")
        return 0
    if len(args) >= 2 and args[0] == "start":
        for name in args[1:]:
            if not name.endswith(".service"):
                name += ".service"
            f = unit_dir / name
            if not f.is_file():
                return _die(f"Failed to start {name}: Unit {name} not found.", 5)
            try:
                spec = parse_unit(f.read_text(), name)
            except ValueError as e:
                return _die(
                    f"Failed to start {name}: Unit {name} has a bad unit file setting.\n{e}"
                )
            req = urllib.request.Request(
                f"http://{os.environ['LAB_FAKE_SYSTEMD']}/fake-systemd/start",
                data=json.dumps(spec).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                why = r.read().decode()
            if why:
                return _die(
                    f"Job for {name} failed because the control process exited with error "
                    f"code.\n{why}"
                )
        return 0
    return _die(f"systemctl (fake VM): unsupported command {shlex.join(argv)!r}")


# -- curl ------------------------------------------------------------------------------------


def _real(name: str) -> str:
    here = Path(sys.argv[0]).resolve().parent
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / name
        if d and p.is_file() and os.access(p, os.X_OK) and p.resolve().parent != here:
            return str(p)
    raise FileNotFoundError(name)


_UV_INSTALLER = """#!/bin/sh
# the fake uv installer: puts the uv shim where the real installer would put uv
set -eu
dest="${{UV_UNMANAGED_INSTALL:-}}"
if [ -z "$dest" ]; then
  echo "fake uv installer: without UV_UNMANAGED_INSTALL it would edit shell profiles" >&2
  exit 1
fi
mkdir -p "$dest"
cp {shim} "$dest/uv"
echo "installed uv {version} to $dest"
"""


def curl(argv: list[str]) -> int:
    urls = [a for a in argv if re.match(r"^[a-z]+://", a)]
    if len(urls) != 1:
        return _die("curl: (2) the fake VM's curl takes exactly one URL")
    url = urls[0]
    if re.match(r"^http://(127\.0\.0\.1|localhost)[:/]", url):
        real = _real("curl")
        os.execv(real, [real, *argv])
    m = re.fullmatch(r"https://astral\.sh/uv/(\d+\.\d+\.\d+)/install\.sh", url)
    if m:
        flags = [a for a in argv if a != url]
        for f in flags:
            if not re.fullmatch(r"-[LsSf]+|--proto|=https|--tlsv1\.2", f):
                return _die(f"curl: option {f}: is unknown (fake VM)", 2)
        shim = shlex.quote(str(Path(sys.argv[0]).resolve().parent / "uv"))
        sys.stdout.write(_UV_INSTALLER.format(shim=shim, version=m.group(1)))
        return 0
    host = re.sub(r"^[a-z]+://([^/:]+).*$", r"\1", url)
    return _die(f"curl: (6) Could not resolve host: {host}", 6)


# -- uv --------------------------------------------------------------------------------------


def _take_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            if i + 1 >= len(args):
                raise ValueError(f"a value is required for '{flag} <VALUE>' but none was supplied")
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(flag + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def _python_dir() -> Path:
    d = os.environ.get("UV_PYTHON_INSTALL_DIR")
    return Path(d) if d else Path(os.environ.get("HOME", "/root")) / ".local/share/uv/python"


def _managed(version: str) -> Path | None:
    for p in sorted(_python_dir().glob(f"cpython-{version}*/bin/python{version}")):
        return p
    return None


def _installed_version(python: str, dist: str) -> str | None:
    res = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, sys\n"
            "try: print(m.version(sys.argv[1]))\nexcept m.PackageNotFoundError: pass",
            dist,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res.stdout.strip() or None


def uv(argv: list[str]) -> int:
    args = [a for a in argv if a not in ("-q", "--quiet", "--no-progress")]
    try:
        if args == ["--version"]:
            print("uv 0.0.0 (fake VM shim)")
            return 0
        if args[:2] == ["python", "install"]:
            return _uv_python_install(args[2:])
        if args[:1] == ["venv"]:
            return _uv_venv(args[1:])
        if args[:2] == ["pip", "install"]:
            return _uv_pip_install(args[2:])
    except ValueError as e:
        return _die(f"error: {e}", 2)
    return _die(f"error: unrecognized subcommand {shlex.join(argv)!r} (fake VM uv)", 2)


def _uv_python_install(args: list[str]) -> int:
    if len(args) != 1 or not re.fullmatch(r"3\.\d+(\.\d+)?", args[0]):
        raise ValueError(f"unexpected arguments to `uv python install`: {args}")
    want = args[0]
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want != have and not want.startswith(have + "."):
        raise ValueError(f"the fake VM can only 'download' Python {have}, not {want}")
    d = _python_dir() / f"cpython-{have}-linux-x86_64-gnu" / "bin"
    d.mkdir(parents=True, exist_ok=True)
    link = d / f"python{have}"
    if not link.exists():
        link.symlink_to(os.environ.get("LAB_FAKE_PYTHON") or sys.executable)
    print(f"Installed Python {have} in {d.parent}")
    return 0


def _uv_venv(args: list[str]) -> int:
    python = _take_value(args, "--python") or _take_value(args, "-p")
    seed = "--seed" in args
    clear = "--clear" in args
    args = [a for a in args if a not in ("--seed", "--clear")]
    if len(args) != 1 or args[0].startswith("-"):
        raise ValueError(f"unexpected arguments to `uv venv`: {args}")
    path = Path(args[0])
    if python is None:
        raise ValueError("the lab's bootstrap must name the Python of its venv (--python)")
    if os.environ.get("UV_PYTHON_PREFERENCE") == "only-managed" and _managed(python) is None:
        raise ValueError(f"No interpreter found for Python {python} in managed installations")
    if path.exists() and any(path.iterdir()) and not clear:
        raise ValueError(f"A directory already exists at: {path} (use --clear to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    ours = os.environ.get("LAB_FAKE_VENV")
    if ours and (Path(ours) / "pyvenv.cfg").is_file():
        if path.exists():
            path.rmdir()
        path.symlink_to(ours, target_is_directory=True)  # the test venv: its packages too
    else:
        (path / "bin").mkdir(parents=True, exist_ok=True)
        (path / "bin" / "python").symlink_to(os.environ.get("LAB_FAKE_PYTHON") or sys.executable)
    print(f"Creating virtual environment{' with seed packages' if seed else ''} at: {path}")
    return 0


def _uv_pip_install(args: list[str]) -> int:
    python = _take_value(args, "--python") or _take_value(args, "-p")
    index = _take_value(args, "--index-url") or _take_value(args, "--default-index")
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise ValueError(f"unexpected argument '{unknown[0]}' found")
    if not args:
        raise ValueError("the following required arguments were not provided: <PACKAGE|...>")
    if python is None:
        raise ValueError("the lab's bootstrap must name the venv's python (--python)")
    if not os.access(python, os.X_OK):
        raise ValueError(f"Failed to inspect Python interpreter from provided path at `{python}`")
    if index is not None and not TORCH_INDEX.match(index):
        raise ValueError(f"the fake VM knows no index {index}")
    for req in args:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)(\+([a-z0-9.]+))?", req)
        if not m:
            raise ValueError(f"the lab's bootstrap pins every package exactly, not {req!r}")
        dist, version, local = m.group(1), m.group(2), m.group(4)
        if local and (index is None or not index.endswith("/" + local)):
            raise ValueError(
                f"No solution found when resolving dependencies: {dist}=={version}+{local} is "
                f"not on {index or 'PyPI'} (PyTorch's {local} builds are on "
                f"https://download.pytorch.org/whl/{local})"
            )
        if index is not None and not local:
            raise ValueError(f"{req}: PyTorch's index holds CUDA builds: pin one (+cuXYZ)")
        have = _installed_version(python, dist)
        if have is None or have.split("+")[0] != version:
            raise ValueError(
                f"the fake VM has no network: {dist}=={version} would be downloaded "
                f"(the test venv has {have or 'none'})"
            )
    print(f"Audited {len(args)} package{'s' if len(args) > 1 else ''}")
    return 0


# -- nvidia-smi ------------------------------------------------------------------------------


def nvidia_smi(argv: list[str]) -> int:
    n = int(os.environ.get("LAB_FAKE_GPUS") or 0)
    driver = os.environ.get("LAB_FAKE_DRIVER") or "570.172.08"
    gpu = os.environ.get("LAB_FAKE_GPU_NAME") or "NVIDIA L4"
    if n == 0:
        return _die(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.",
            9,
        )
    if argv == ["-L"]:
        for i in range(n):
            print(f"GPU {i}: {gpu} (UUID: GPU-00000000-0000-0000-0000-00000000000{i})")
        return 0
    q = [a for a in argv if a.startswith("--query-gpu=")]
    if len(q) == 1 and sorted(argv) == sorted([q[0], "--format=csv,noheader"]):
        fields = q[0].split("=", 1)[1].split(",")
        known = {"driver_version": driver, "name": gpu, "count": str(n)}
        if any(f not in known for f in fields):
            return _die(f'Field "{fields}" is not a valid field to query.', 2)
        for _ in range(n):
            print(", ".join(known[f] for f in fields))
        return 0
    if not argv:
        print(f"| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: 12.8 |")
        return 0
    return _die("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.", 2)
