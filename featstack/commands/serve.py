"""`featstack serve` (and serve.py):
the photo app, a web page and a JSON API that answer photos through a stack.py run.
"""
import argparse
import ipaddress
import os
import re

from ..cli import parse_command, run_main
from ..paths import MODELS_DIR

DESCRIPTION = ("The photo app: a web page and a JSON API that say which class (breed) is in a photo, through a trained "
               "stack.py run, with exactly predict.py's answers.")
EXAMPLES = """examples:
  %(prog)s
  %(prog)s --run models/RUN_ID --port 8080
  FEATSTACK_TOKEN=$(openssl rand -hex 16) %(prog)s --host 0.0.0.0
"""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
        return value
    return parse


def _ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _host_patterns(text: str) -> tuple[str, ...]:
    """NAME, *.DOMAIN, an address ([::1] as ::1) or *; a port or scheme is refused (any port is accepted)."""
    patterns = tuple(p.strip().lower().strip("[]") for p in text.split(",") if p.strip())
    for pattern in patterns:
        if not re.fullmatch(r"\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*", pattern) and not _ipv6(pattern):
            raise argparse.ArgumentTypeError(f"{pattern!r}: give host names without port or scheme, comma-separated: "
                                             "NAME, *.DOMAIN, an address, or *")
    if not patterns:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more host names, comma-separated")
    return patterns


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a stack.py run folder (default: the newest under --models-dir)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="where runs are (default models/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 takes a free one)")
    p.add_argument("--max-batch", type=_positive(int), default=32,
                   help="most photos answered in one forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the first photo of a batch may wait for others to join it: while others are "
                        "being decoded, or fewer have come than the last batch had (default 20)")
    p.add_argument("--max-upload-mb", type=_positive(float), default=20.0,
                   help="largest request body, all its photos together (default 20)")
    p.add_argument("--max-megapixels", type=_positive(float), default=50.0,
                   help="largest photo, judged from its header before decoding (default 50)")
    p.add_argument("--max-request-megapixels", type=_positive(float), default=100.0,
                   help="most pixels of all the photos of one request together, judged from their headers before "
                        "decoding (default 100)")
    p.add_argument("--stall-timeout", type=_positive(float), default=30.0,
                   help="seconds a client may send nothing in the middle of a request before its connection is "
                        "closed (default 30)")
    p.add_argument("--request-timeout", type=_positive(float), default=120.0,
                   help="seconds from a request's first byte to its last before its connection is closed, however "
                        "steadily it comes (a client dripping bytes; default 120: 20 MB needs 170 KB/s)")
    p.add_argument("--allowed-hosts", type=_host_patterns, default=(),
                   help="more names the Host header may give, comma-separated: NAME, *.DOMAIN, or * for any (default: "
                        "only the --host address, localhost, 127.0.0.1 and [::1], and this machine's name on 0.0.0.0; "
                        "a web page's own domain is refused, against DNS rebinding)")
    p.add_argument("--token", default=None,
                   help="require Authorization: Bearer TOKEN on the API (default: $FEATSTACK_TOKEN; prefer that "
                        "variable: a --token argument is visible to every user in ps)")
    p.add_argument("--no-token", action="store_true",
                   help="serve the API without a token on an address beyond this machine (--host 0.0.0.0)")
    a = parse_command(p, argv)
    if a.max_wait_ms < 0:
        p.error(f"--max-wait-ms {a.max_wait_ms:g}: must be 0 or more")
    token = a.token if a.token is not None else os.environ.get("FEATSTACK_TOKEN")
    if a.no_token and token is not None:
        given = "--token" if a.token is not None else "FEATSTACK_TOKEN"
        p.error(f"--no-token with a token ({given}): give one or the other")
    from ..heartbeat import heartbeat, printer
    with heartbeat("loading the app's libraries", printer("stderr", prefix="featstack: ")):
        from ..serve import ServeConfig, serve
    config = ServeConfig(run=a.run, models_dir=a.models_dir, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                         max_upload_mb=a.max_upload_mb, max_megapixels=a.max_megapixels,
                         max_request_megapixels=a.max_request_megapixels, stall_timeout_s=a.stall_timeout,
                         request_timeout_s=a.request_timeout, allowed_hosts=a.allowed_hosts,
                         token=token, open_api=a.no_token, verbose=a.verbose)
    run_main(serve, config, host=a.host, port=a.port)
