"""Who may use the dashboard: loopback binds are open, anything else needs SAMLAB_PASSWORD.

A Streamlit server bound to a loopback address (127.0.0.0/8, ::1 or localhost) is reachable from this
machine only and asks for nothing. Bound to any other address — 0.0.0.0, a LAN address, or no address at
all, which makes Streamlit listen on every interface — anyone who reaches the port could launch, cancel
and delete runs, so the dashboard refuses to serve unless SAMLAB_PASSWORD is set, and then every page
asks for it once per session. Pure functions here (no streamlit import); `dashboard.common.page_setup`
applies them, and `python -m dashboard.access --host HOST` is the check `make run` does before starting.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import os
import sys

PASSWORD_ENV = "SAMLAB_PASSWORD"


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; False for anything else, including no address."""
    host = (address or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # empty, a host name or garbage: not provably loopback
        return False


def password() -> str:
    """The configured secret ('' when none)."""
    return os.environ.get(PASSWORD_ENV, "")


def refusal(address: str | None) -> str | None:
    """The one-line reason not to serve, or None when serving is allowed."""
    if is_loopback(address) or password():
        return None
    where = f"bound to {address}" if address else "bound to every interface (no server.address)"
    return (f"samlab refuses to serve: the dashboard is {where}, so anyone who reaches the port could launch, "
            f"cancel and delete runs; set {PASSWORD_ENV} or bind 127.0.0.1.")


def needs_password(address: str | None) -> bool:
    return not is_loopback(address)


def check_password(typed: str, secret: str) -> bool:
    """Constant-time comparison of digests (no timing hint of how much, or how long, the secret is)."""
    digest = lambda text: hashlib.sha256(text.encode("utf-8")).digest()  # noqa: E731
    return bool(secret) and hmac.compare_digest(digest(typed), digest(secret))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refuse to start a dashboard exposed without SAMLAB_PASSWORD.")
    parser.add_argument("--host", required=True, help="the address the server will bind")
    reason = refusal(parser.parse_args(argv).host)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
