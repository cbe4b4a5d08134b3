#!/usr/bin/env python3
"""Retrieve a maildrop with Python's poplib (a real client nobody here wrote).

usage: pop3_fetch.py HOST PORT USER PASSWORD [--stls] [--ssl] [--dele] [--apop-free]
Prints one JSON line: {"ok": bool, "uidl": [...], "messages": [hex of each
message as retrieved, lines joined with CRLF], "error": str}.
"""
import json
import poplib
import ssl
import sys


def main():
    host, port, user, password = sys.argv[1:5]
    opts = sys.argv[5:]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        if "--ssl" in opts:
            p = poplib.POP3_SSL(host, int(port), context=ctx, timeout=30)
        else:
            p = poplib.POP3(host, int(port), timeout=30)
        if "--stls" in opts:
            p.stls(context=ctx)
        p.user(user)
        p.pass_(password)
        count, _size = p.stat()
        uidl = [x.decode().split()[1] for x in p.uidl()[1]]
        sizes = [int(x.decode().split()[1]) for x in p.list()[1]]
        messages = []
        for i in range(1, count + 1):
            _resp, lines, octets = p.retr(i)
            data = b"\r\n".join(lines) + b"\r\n"
            messages.append(data.hex())
            if "--dele" in opts:
                p.dele(i)
        p.quit()
        print(json.dumps({"ok": True, "uidl": uidl, "sizes": sizes, "messages": messages}))
    except poplib.error_proto as e:
        print(json.dumps({"ok": False, "error": e.args[0].decode("latin-1") if e.args else ""}))
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": repr(e)}))


main()
