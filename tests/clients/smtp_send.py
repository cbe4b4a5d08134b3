#!/usr/bin/env python3
"""Send one message with Python's smtplib (a real client nobody here wrote).

usage: smtp_send.py HOST PORT FROM TO[,TO...] MESSAGE_FILE [--starttls] [--ssl]
                    [--user U --password P]
Prints one JSON line: {"ok": bool, "code": int, "error": str}.
"""
import json
import smtplib
import ssl
import sys


def main():
    args = sys.argv[1:]
    host, port, sender, rcpts, path = args[:5]
    opts = args[5:]
    user = password = None
    if "--user" in opts:
        user = opts[opts.index("--user") + 1]
        password = opts[opts.index("--password") + 1]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's certificate is self-signed in tests
    with open(path, "rb") as f:
        msg = f.read()
    try:
        if "--ssl" in opts:
            s = smtplib.SMTP_SSL(host, int(port), context=ctx, timeout=30)
        else:
            s = smtplib.SMTP(host, int(port), timeout=30)
        s.ehlo("client.test")
        if "--starttls" in opts:
            s.starttls(context=ctx)
            s.ehlo("client.test")
        if user:
            s.login(user, password)
        refused = s.sendmail(sender, rcpts.split(","), msg)
        s.quit()
        print(json.dumps({"ok": True, "code": 250, "refused": {k: v[0] for k, v in refused.items()}}))
    except smtplib.SMTPRecipientsRefused as e:
        code = list(e.recipients.values())[0][0]
        print(json.dumps({"ok": False, "code": code, "error": str(e)}))
    except smtplib.SMTPResponseException as e:
        print(json.dumps({"ok": False, "code": e.smtp_code, "error": e.smtp_error.decode("latin-1")}))
    except Exception as e:  # noqa: BLE001 - report any client failure
        print(json.dumps({"ok": False, "code": 0, "error": repr(e)}))


main()
