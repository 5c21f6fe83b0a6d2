"""USB media and export targets: detection (``detect``), the ClamAV scan (``clamav``), the gate
that allows a write only onto freshly scanned, clean, enrolled storage (``gate``) and the
operations the daemon offers on them (``ops``). Enrolments and scan records are kept by
``nvr_guard.store.media``.

The package imports none of its modules itself: the store imports ``detect`` for its types, and
an eager package would load the gate (which needs the store) half-way through that import.
"""
