"""`imguard console`: a web console for the people who read the alerts (issue 22).

A separate process on the data folder (or the shared PostgreSQL archive), never the gateway's memory:

    accounts.py   local accounts (Argon2), roles, login throttling
    data.py       read-only data access: the alert index (built from alerts.jsonl), the archive, the quarantine
    release.py    the quarantine's release workflow (a state table on the quarantine's ledger), the AES zip
    web.py        sessions, CSRF, the access log, security headers
    views.py      the pages (Starlette routes, Jinja2 templates with autoescape), the rule playground included
    chart.py      the server-rendered SVG chart
    serve.py      HTTPS (a certificate from imguard's CA or the admin's), uvicorn
    cli.py        `imguard console` and `imguard console user add`

docs/architecture.md, "The console", is the design.
"""
