"""``jobq web``: a dashboard in the browser (the ``jobq[web]`` extra: Flask, waitress).

::

    browser ──GET page──► app.py (Flask views) ──► data.py (Dashboard) ──► info / JobQueue /
       │    ◄──HTML──────   templates/ (autoescaped)      │ cache.py: one read     Scheduler
       │                                                  │ per key per second     ──► Redis
       └──POST /actions/*──► app.py ── security.py says yes or no (token, CSRF, origin)
    live.js (scripts on): fetches the same page every 2 s, swaps its [data-live] parts

One process of its own, apart from the master: its reads are few batched calls (the ones
``jobq info`` makes), cached a second, so N viewers cost the server what one does. Nothing
of jobq's core imports this package; ``jobq web`` imports it when it runs.
"""
