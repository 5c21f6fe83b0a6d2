"""The web console (``nvr-guard web``): approvers decide, requesters watch approved footage,
auditors read the record, from a browser.

It holds no authority of its own. Every action is a control-socket command the daemon runs on
behalf of the logged-in person (``on_behalf``), with the same command table and role checks as
the CLI; the daemon opens a session only when the password helper (``nvr-guard web-auth``, PAM
service ``nvr-guard``) reports a good password.
"""
