"""The official kaggle command-line tool: credentials checked first, failures explained in one line."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .errors import FeatstackError

HINTS = [
    (("403", "Forbidden"), "accept the competition's rules on its Kaggle page (Join Competition), then submit again"),
    (("404", "Not Found"), "check the competition slug: the part after kaggle.com/competitions/, "
                           "e.g. dog-breed-identification"),
    (("401", "Unauthorized"), "your API key is wrong or expired: create a new token at kaggle.com/settings"),
    (("Max retries", "NewConnectionError", "Name or service not known", "Temporary failure in name resolution",
      "Connection refused", "ConnectionError", "timed out"),
     "no connection to kaggle.com: check the network or proxy (kaggle config set -n proxy -v URL)"),
]


def config_dirs() -> list[Path]:
    """Where the kaggle tool looks for kaggle.json / access_token, in its order."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kaggle"
    return [Path.home() / ".kaggle", xdg]


def find_credentials() -> str:
    """Say where the kaggle tool will find credentials (never their value), or raise saying what to do."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "environment variable KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "environment variables KAGGLE_USERNAME and KAGGLE_KEY"
    for folder in config_dirs():
        for name in ("kaggle.json", "access_token"):
            path = folder / name
            if path.is_file():
                if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
                    print(f"warning: {path} can be read by other users of this machine; run: chmod 600 {path}",
                          file=sys.stderr)
                if name == "kaggle.json":
                    try:
                        creds = json.loads(path.read_text())
                    except (OSError, ValueError):
                        raise FeatstackError(f"{path}: not valid JSON; download a fresh kaggle.json from "
                                             "kaggle.com/settings (API → Create New Token)") from None
                    if not (isinstance(creds, dict) and creds.get("username") and creds.get("key")):
                        raise FeatstackError(f"{path}: needs \"username\" and \"key\"; see kaggle.json.example")
                return str(path)
    where = " or ".join(str(d / "kaggle.json") for d in config_dirs())
    raise FeatstackError(
        "no Kaggle credentials found: on kaggle.com/settings choose API → Create New Token, save the downloaded "
        f"kaggle.json as {where} and chmod 600 it (or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN)")


def _encoded_forms(value: str | bytes) -> list[str]:
    """``value`` as tools print it encoded: base64 standard and URL-safe, with and without ``=`` padding, and hex."""
    raw = value.encode() if isinstance(value, str) else value
    out = [raw.hex()]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(raw).decode()
        out += [text, text.rstrip("=")]
        # Inside a longer encoded blob (the credentials re-serialised compactly, a header with other text before the
        # key) the value starts at any byte offset, and base64 spells it differently at each offset modulo 3: the
        # groups made of its bytes alone are the same whatever surrounds it, so those cores are redacted too.
        for shift in range(3):
            groups = (shift + len(raw)) // 3
            core = encode(bytes(shift) + raw).decode()[4 if shift else 0:4 * groups]
            if len(core) >= 16:  # shorter runs of base64 letters turn up in ordinary text
                out.append(core)
    return out


def secrets() -> list[str]:
    """The configured credential values and their base64 forms (the key alone, user:key), longest first."""
    values = [os.environ.get(v, "") for v in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    pairs = [(values[0], values[1])]
    keys = [values[1], values[2]]  # what goes after "Bearer "
    files: list[bytes] = []
    for folder in config_dirs():
        with contextlib.suppress(OSError):
            raw = (folder / "kaggle.json").read_bytes()
            files += [raw, raw.strip()]  # a tool may dump the whole file, encoded, as read or without its newline
        with contextlib.suppress(OSError, ValueError, AttributeError):
            creds = json.loads((folder / "kaggle.json").read_text())
            values += [str(creds.get("username", "")), str(creds.get("key", ""))]
            pairs.append((str(creds.get("username", "")), str(creds.get("key", ""))))
            keys.append(str(creds.get("key", "")))
            files.append(json.dumps(creds).encode())  # as json.dumps re-serialises it
        with contextlib.suppress(OSError):
            token = (folder / "access_token").read_text().strip()
            values.append(token)
            keys.append(token)
    # Some kaggle versions echo the Authorization header, where username:key (basic) or "Bearer KEY" appears
    # base64-encoded; a key, a token or the whole credentials file may also be printed encoded on its own.
    encoded = [form for u, k in pairs if u and k for form in _encoded_forms(f"{u}:{k}")]
    encoded += [form for k in keys if k for form in _encoded_forms(f"Bearer {k}")]
    encoded += [form for v in values if v for form in _encoded_forms(v)]
    encoded += [form for f in files if f.strip() for form in _encoded_forms(f)]
    # Values under 3 characters cannot be told apart from ordinary text; Kaggle's are far longer.
    return sorted({v for v in values + encoded if len(v) >= 3}, key=len, reverse=True)


# Where a tool wraps long lines, a value is split by a line break (and the next line's indentation); where it
# colours its output, by terminal escape codes (ESC [ ... m and the like), possibly several in a row.
_WRAP = r"(?:[ \t]*\r?\n[ \t]*|\x1b\[[0-9;?]*[ -/]*[@-~])*"


def redact(text: str) -> str:
    """``text`` with every configured Kaggle credential value replaced by ***: in any letter case, in its base64 and
    hex forms (also of "Bearer KEY", "user:key" and the whole kaggle.json), and split over lines or by colour
    codes."""
    for value in secrets():
        text = re.sub(_WRAP.join(map(re.escape, value)), "***", text, flags=re.IGNORECASE)
    return text


def find_kaggle() -> str | None:
    """The kaggle tool where the user installed it: beside the running Python (a venv's bin/) first, then PATH."""
    return shutil.which("kaggle", path=str(Path(sys.executable).parent)) or shutil.which("kaggle")


def submit_file(competition: str, path: Path, message: str) -> None:
    source = find_credentials()
    exe = find_kaggle()
    if exe is None:
        raise FeatstackError(f"the kaggle command-line tool is not installed (not in {Path(sys.executable).parent} "
                             f"nor on PATH): {sys.executable} -m pip install kaggle")
    print(f"submitting {path} to {competition} (credentials from {source})")
    cmd = [exe, "competitions", "submit", competition, "-f", str(path), "-m", message]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise FeatstackError("kaggle competitions submit did not answer in 10 minutes; check the network") from None
    output = redact((proc.stdout + proc.stderr).strip())
    # The tool has been known to print an HTTP error yet exit 0, so its words count as much as its exit code.
    failed = proc.returncode != 0 or any(s in output for s in ("403", "404", "401", "error", "Error"))
    if failed:
        lines = output.splitlines() or [f"exit code {proc.returncode}"]
        hint = next((h for keys, h in HINTS if any(k in output for k in keys)), "see the kaggle tool's message above")
        if lines[:-1]:
            print("\n".join(lines[:-1]), file=sys.stderr)  # its last line is in the error, said once
        raise FeatstackError(f"kaggle competitions submit failed: {lines[-1]} — {hint}")
    print(output)
